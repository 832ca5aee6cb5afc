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


def _sample(first, noop, outcomes):
    return {
        "first_s": first,
        "noop_s": noop,
        "first_mib": 70.0,
        "noop_mib": 60.0,
        "noop_changes": 0,
        "outcomes": outcomes,
    }


def test_a_fleet_cell_counts_only_when_every_check_matches_gpufleets_in_every_sample():
    from bench import fleet

    ours = {"test_nvidia.py::test_held[ssh://lab-1]": "passed", "test_gpu.py::test_smi[ssh://lab-1]": "skipped"}
    theirs = [_sample(90, 20, ours), _sample(95, 25, {**ours, "test_gpu.py::test_smi[ssh://lab-1]": "passed"})]
    cell = fleet.cell(theirs, ours)
    assert cell["counts"] is False
    assert cell["checks_differ_from_gpufleet"] == ["test_gpu.py::test_smi[ssh://lab-1]: passed (gpufleet: skipped)"]
    assert cell["noop_s"] == {"median": 22.5, "min": 20, "max": 25, "samples": [20, 25]}
    same = fleet.cell([_sample(90, 20, ours), _sample(91, 30, dict(ours))], ours)
    assert same["counts"] is True and same["checks"] == {"passed": 1, "skipped": 1, "failed": 0}


def test_a_fleet_target_is_met_only_when_the_whole_range_meets_it():
    from bench import fleet

    ours = {"test_nvidia.py::test_held[ssh://lab-1]": "passed"}
    row = {
        "hosts": 1,
        "orders": [["gpufleet", "ansible_tuned"], ["ansible_tuned", "gpufleet"], ["gpufleet", "ansible_tuned"]],
        "gpufleet": fleet.cell([_sample(50, n, ours) for n in (5.0, 6.0, 7.0)], ours),
        "ansible_tuned": fleet.cell([_sample(90, n, ours) for n in (20.0, 25.0, 30.0)], ours),
    }
    table = "\n".join(report.fleet_table([row]))
    # medians alone would say 6 / 25 = 0.24 (met); the worst case is 7 / 20 = 0.35
    assert "| 1 | Ansible, tuned (`synchronize`) | 90.0 (90.0–90.0) | 25.0 (20.0–30.0) | 0.35 (**missed**) |" in table
    assert "orders run: gpufleet → ansible_tuned; ansible_tuned → gpufleet; gpufleet → ansible_tuned." in table
    assert "Every check had the same outcome on every variant's hosts as on gpufleet's, in every sample." in table
