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
