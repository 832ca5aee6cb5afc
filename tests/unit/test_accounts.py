"""The services' system accounts: the fact read from ``getent`` and the commands that make one."""

from operations.services.accounts import NO_HOME, NO_LOGIN, SystemAccount, account_commands

# Captured on a lab host (Debian 12) after a deploy: `getent passwd gpufleet-chat || echo -;
# getent group gpufleet-chat || echo -`, then the same for an account that is not there.
PRESENT = ["gpufleet-chat:x:60600:60600::/nonexistent:/usr/sbin/nologin", "gpufleet-chat:x:60600:"]
ABSENT = ["-", "-"]


def test_the_fact_reads_the_passwd_entry_and_the_groups_id():
    assert SystemAccount().process(PRESENT) == {
        "user": {"uid": 60600, "gid": 60600, "home": "/nonexistent", "shell": "/usr/sbin/nologin"},
        "group": 60600,
    }


def test_the_fact_says_none_for_what_is_not_there():
    assert SystemAccount().process(ABSENT) == {"user": None, "group": None}
    assert SystemAccount().process(["-", "gpufleet-chat:x:60600:"]) == {"user": None, "group": 60600}


def test_the_command_quotes_the_name():
    assert (
        SystemAccount().command("gpufleet-a b")
        == "getent passwd 'gpufleet-a b' || echo -; getent group 'gpufleet-a b' || echo -"
    )


def test_an_account_in_place_needs_nothing():
    assert account_commands("gpufleet-chat", 60600, 60600, SystemAccount().process(PRESENT)) == []


def test_a_missing_account_and_group_are_added_group_first():
    assert account_commands("gpufleet-chat", 60601, 60601, SystemAccount().process(ABSENT)) == [
        "groupadd --system --gid 60601 gpufleet-chat",
        f"useradd --system --uid 60601 --gid gpufleet-chat --shell {NO_LOGIN} --home-dir {NO_HOME} "
        "--no-create-home gpufleet-chat",
    ]


def test_an_account_that_drifted_is_put_back():
    found = {"user": {"uid": 60600, "gid": 100, "home": "/home/chat", "shell": "/bin/bash"}, "group": 60600}
    assert account_commands("gpufleet-chat", 60600, 60600, found) == [
        f"usermod --gid gpufleet-chat --shell {NO_LOGIN} --home {NO_HOME} gpufleet-chat"
    ]


def test_a_group_of_another_id_is_moved_to_the_accounts():
    found = {"user": {"uid": 60600, "gid": 60700, "home": NO_HOME, "shell": NO_LOGIN}, "group": 60700}
    assert account_commands("gpufleet-chat", 60600, 60600, found) == [
        "groupmod --gid 60600 gpufleet-chat",
        "usermod --gid gpufleet-chat gpufleet-chat",
    ]
