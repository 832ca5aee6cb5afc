"""The benchmark section of docs/benchmark.md is what bench/report.py makes of the JSON under bench/results/:
no number in it is copied by hand."""

from bench import record, report


def test_readme_section_is_made_from_the_results_json():
    documents = record.load()
    assert set(documents) == set(record.PARTS), "bench/results/ lacks a part's JSON"
    assert report.readme_section() == report.markdown(documents)


def test_every_result_names_its_machine_and_versions():
    for part, document in record.load().items():
        machine = document["machine"]
        assert machine["cpu"] and machine["cores"] and machine["kernel"], part
        assert machine["versions"]["pyinfra"] and machine["versions"]["python"], part


def test_the_scale_part_counts_each_hosts_commands_from_pyinfras_debug_log_and_fits_a_line():
    """The lines counted are pyinfra's SSH connector's own debug line (connectors/ssh.py's format,
    read from the installed pyinfra, so a change there fails here); the fit is least squares."""
    import inspect

    from pyinfra.connectors import ssh

    from bench import scale

    said = "Running command on %s: (pty=%s) %s"
    assert f'"{said}"' in inspect.getsource(ssh)
    log = "\n".join(
        ["--> Preparing operations..."]
        + [said % ("lab-1", False, "sh -c 'true'")] * 3
        + [said % ("lab-12", False, "sh -c 'cat /x'")] * 2
    )
    assert scale.commands_per_host(log) == {"lab-1": 3, "lab-12": 2}
    intercept, slope = scale.fit([(1, 5.0), (4, 8.0), (8, 12.0), (16, 20.0)])
    assert (round(intercept, 6), round(slope, 6)) == (4.0, 1.0)
    rows = [
        {
            "hosts": hosts,
            "first_s": 50.0 * hosts,
            "first_mib": 70.0,
            "first_cpu_s": 10.0,
            "noop_samples_s": [4.0 + hosts, 5.0 + hosts, 6.0 + hosts],
            "noop_s": 5.0 + hosts,
            "noop_mib": 60.0,
            "noop_cpu_s": 3.0,
            "noop_changes": [0, 0, 0],
            "noop_commands_per_host": {"min": 78, "max": 81},
        }
        for hosts in (1, 4)
    ]
    fitted = {"intercept_s": 4.0, "per_extra_host_s": 1.0, "extrapolated_50_s": 54.0}
    table = "\n".join(
        report.scale_table(
            {
                "rows": rows,
                "fit": {"first": fitted, "noop": fitted},
                "noop_cpu_per_extra_host_s": 0.5,
                "extrapolated_to": 50,
            }
        )
    )
    assert "| 1 | 50.0 | 6.00 (5.00–7.00) | 0, 0, 0 | 78–81 | 70 / 60 | 10.0 / 3.0 |" in table
    assert "no-op ≤ 3 s for one host (6.00 s: **missed**), ≤ 0.3 s per extra host (**missed**)" in table
    assert "**Extrapolated, not measured**, to 50 hosts" in table
