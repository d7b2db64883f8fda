"""bench.scale: its pure helpers (fast) and one small end-to-end run (slow)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPOSITORY

from bench import scale


def test_scaling_exponent_recovers_the_power():
    assert scale.scaling_exponent((1e5, 1e6), (10.0, 100.0)) == pytest.approx(1.0)
    assert scale.scaling_exponent((1e5, 1e6), (10.0, 10.0)) == pytest.approx(0.0)
    assert scale.scaling_exponent((100, 400), (3.0, 48.0)) == pytest.approx(2.0)
    assert scale.scaling_exponent((2e5, 1e6), (4.0, 4.0 * 5**1.1)) == pytest.approx(1.1)
    for sizes, seconds in [((10, 10), (1.0, 2.0)), ((10, 20), (0.0, 1.0)), ((0, 20), (1.0, 2.0))]:
        with pytest.raises(ValueError):
            scale.scaling_exponent(sizes, seconds)


def test_synthetic_documents_are_deterministic_and_abstract_like():
    vocabulary = scale.Vocabulary.from_tokenizer()
    first = scale.synthetic_documents(vocabulary, 100, 300, seed=3)
    assert first.equals(scale.synthetic_documents(vocabulary, 100, 300, seed=3))
    assert not first["text"].equals(scale.synthetic_documents(vocabulary, 100, 300, seed=4)["text"])
    assert first["_id"].to_pylist()[:2] == ["d100", "d101"]
    words = np.array([len(text.split()) for text in first["text"].to_pylist()])
    assert words.min() >= 150 and words.max() <= 250
    titles = np.array([len(title.split()) for title in first["title"].to_pylist()])
    assert titles.min() >= 6 and titles.max() <= 15
    counts: dict[str, int] = {}
    for text in first["text"].to_pylist():
        for word in text.split():
            counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] > 20 * ranked[len(ranked) // 2]  # Zipf-like: a few words dominate


def test_synthetic_queries_skip_the_most_frequent_words():
    vocabulary = scale.Vocabulary.from_tokenizer()
    queries = scale.synthetic_queries(vocabulary, 500, seed=0)
    assert queries.equals(scale.synthetic_queries(vocabulary, 500, seed=0))
    lengths = [len(text.split()) for text in queries["text"].to_pylist()]
    assert min(lengths) >= 3 and max(lengths) <= 10
    frequent = set(vocabulary.words.to_pylist()[:50])
    assert not frequent & {word for text in queries["text"].to_pylist() for word in text.split()}


def test_generated_corpus_layout_and_cache(tmp_path):
    corpus = scale.generate_corpus(tmp_path, 1_003, seed=1, parquet_files=4)
    names = sorted(path.name for path in corpus.iterdir())
    assert names == ["corpus.jsonl", "part-000.parquet", "part-001.parquet", "part-002.parquet", "part-003.parquet"]
    parquet_rows = sum(pq.read_metadata(corpus / name).num_rows for name in names if name.endswith(".parquet"))
    lines = (corpus / "corpus.jsonl").read_text().splitlines()
    assert parquet_rows == 1_003 * 3 // 4 and parquet_rows + len(lines) == 1_003
    records = [json.loads(line) for line in lines]
    assert records[0]["_id"] == f"d{parquet_rows}" and records[-1]["_id"] == "d1002"
    stamp = (corpus.parent / "spec.json").stat().st_mtime_ns
    assert scale.generate_corpus(tmp_path, 1_003, seed=1, parquet_files=4) == corpus  # cached
    assert (corpus.parent / "spec.json").stat().st_mtime_ns == stamp
    texts = scale.read_contents(corpus, 800)
    assert len(texts) == 800 and texts[0].startswith(pq.read_table(corpus / "part-000.parquet")["title"][0].as_py() + " ")


def test_stage_monitor_counts_written_and_spilled_files(tmp_path):
    spill, written = tmp_path / "spill", tmp_path / "out"
    spill.mkdir()
    written.mkdir()
    (spill / "old").write_bytes(b"x" * 10)
    with scale.StageMonitor("demo", rows=5, written=[written], spill_folder=spill, interval=0.01) as monitor:
        (written / "a").write_bytes(b"y" * 100)
        (spill / "new").write_bytes(b"z" * 40)
    result = monitor.result
    assert result.bytes_written == 100 and result.spilled_bytes == 40 and result.spill_folder_peak_bytes == 50
    assert result.driver_peak_rss_bytes > 0 and result.wall_s > 0 and math.isclose(result.rows_per_s, 5 / result.wall_s)
    series = result.memory_series
    assert list(series) == list(scale.MEMORY_COLUMNS) and len({len(values) for values in series.values()}) == 1
    assert len(series["seconds"]) >= 2 and series["seconds"] == sorted(series["seconds"]) and min(series["driver_rss_mib"]) > 0
    assert all(tree >= driver for tree, driver in zip(series["tree_rss_mib"], series["driver_rss_mib"], strict=True))
    assert result.memory_flatness["samples"] == len(series["seconds"]) and result.memory_flatness["verdict"] in ("flat", "growing", "too short")
    processes = result.process_series
    assert len(processes) == len(series["seconds"]) and all(len(snapshot) >= 1 for snapshot in processes)
    driver = (os.getpid(), next(iter(processes[0]))[1])
    assert all(snapshot[driver][0] == "driver" for snapshot in processes)
    assert [round(snapshot[driver][1], 1) for snapshot in processes] == series["driver_rss_mib"]
    assert [round(sum(rss for _, rss in snapshot.values()), 1) for snapshot in processes] == pytest.approx(series["tree_rss_mib"], abs=0.2)
    assert "process_series" not in result.to_json() and result.to_json()["memory_flatness"] == result.memory_flatness


def test_stage_monitor_with_two_samples_reports_too_short(tmp_path):
    """A stage shorter than one interval: the samples at its start and end, no quartile figures, no error; the CSV still written."""
    with scale.StageMonitor("short", rows=1, interval=60) as monitor:
        pass
    result = monitor.result
    assert len(result.memory_series["seconds"]) == 2 and result.memory_series["seconds"][0] == 0.0
    assert result.memory_flatness["verdict"] == "too short" and result.memory_flatness["tree"]["growth_mib"] is None
    assert result.memory_flatness["tree_verdict"] == "too short" and result.memory_flatness["processes"]["persistent"] is None
    assert "too short" in scale.flatness_line(result)
    path = scale.memory_csv_path(tmp_path / "scale.json", 10_000, "first_stage")
    assert path == tmp_path / "scale-memory-10000-first_stage.csv"
    scale.write_memory_csv(path, result.memory_series)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(scale.MEMORY_COLUMNS) and len(lines) == 3
    assert [float(value) for value in lines[1].split(",")] == [result.memory_series[name][0] for name in scale.MEMORY_COLUMNS]
    processes_path = scale.memory_csv_path(tmp_path / "scale.json", 10_000, "first_stage", processes=True)
    assert processes_path == tmp_path / "scale-memory-10000-first_stage-processes.csv"
    scale.write_process_csv(processes_path, result.memory_series["seconds"], result.process_series)
    rows = list(csv.DictReader(processes_path.open()))
    assert len(rows) == sum(len(snapshot) for snapshot in result.process_series) and tuple(rows[0]) == scale.PROCESS_COLUMNS
    assert rows[0]["name"] == "driver" and int(rows[0]["pid"]) == os.getpid() and float(rows[0]["seconds"]) == 0.0
    assert sorted(item.name for item in tmp_path.iterdir()) == sorted([path.name, processes_path.name])  # no temporary file left


def series(seconds: np.ndarray, tree: np.ndarray, worker: np.ndarray | None = None) -> dict[str, list[float]]:
    """A memory series as StageMonitor stores it: the driver a flat 500 MiB, the largest worker ``worker`` (default: tree / 4)."""
    worker = tree / 4 if worker is None else worker
    return {"seconds": list(seconds), "driver_rss_mib": [500.0] * len(seconds), "largest_worker_rss_mib": list(worker), "tree_rss_mib": list(tree)}


def tree_flatness(tree_series: dict[str, list[float]]) -> dict:
    """memory_flatness of a tree-level series, with per-process snapshots of a lone flat driver: the tree rule's figures."""
    return scale.memory_flatness(tree_series, [{(1, 0.0): ("driver", 500.0)} for _ in tree_series["seconds"]])


def tree_of(snapshots: list[dict]) -> dict[str, list[float]]:
    """The tree-level series of per-process snapshots, one a second: what StageMonitor derives from them."""
    seconds = np.arange(len(snapshots), dtype=float)
    return {"seconds": list(seconds), "driver_rss_mib": [snapshot[(1, 0.0)][1] for snapshot in snapshots],
            "largest_worker_rss_mib": [max((rss for key, (_, rss) in snapshot.items() if key != (1, 0.0)), default=0.0) for snapshot in snapshots],
            "tree_rss_mib": [sum(rss for _, rss in snapshot.values()) for snapshot in snapshots]}


def steady_tree(samples: int = 400, seed: int = 0) -> list[dict]:
    """A Ray-like tree, one sample a second: the driver (500 MiB), raylet and gcs_server, two ray::ShardGroupSearcher actors
    (700 MiB) and a ray::IDLE worker, RSS noisy but flat after a 40 s start-up (the actors load from 100 MiB), and a task
    process (ray::MapBatches(first_stage), 400 MiB) living 6 s out of every 10 under a new pid: the tree swings by 400 MiB."""
    rng = np.random.default_rng(seed)
    loading = np.minimum(np.arange(samples) / 40, 1.0)
    snapshots = []
    for index in range(samples):
        snapshot = {(1, 0.0): ("driver", 500.0 + rng.normal(0, 1)), (10, 1.0): ("raylet", 80.0 + rng.normal(0, 1)),
                    (11, 1.0): ("gcs_server", 60.0 + rng.normal(0, 0.5)), (14, 2.0): ("ray::IDLE", 90.0 + rng.normal(0, 1))}
        for pid in (12, 13):
            snapshot[(pid, 2.0)] = ("ray::ShardGroupSearcher", 100.0 + 600.0 * loading[index] + rng.normal(0, 5))
        if index % 10 < 6:
            snapshot[(1000 + index // 10, 3.0 + index // 10)] = ("ray::MapBatches(first_stage)", 400.0 + rng.normal(0, 10))
        snapshots.append(snapshot)
    return snapshots


def test_process_flatness_sees_through_transient_processes():
    """The tree sum grows by over 5% in the last quarter as task processes come and go more often; every process that lives
    through the run is flat: flat, where the tree rule says growing."""
    snapshots = steady_tree()
    for index in range(300, 400):  # the last quarter: a second task process, 500 MiB, 8 s out of every 10
        if index % 10 < 8:
            snapshots[index][(5000 + index // 10, 9.0)] = ("ray::MapBatches(rank_and_write)", 500.0)
    flatness = scale.memory_flatness(tree_of(snapshots), snapshots)
    assert flatness["tree_verdict"] == "growing" and flatness["tree"]["growth_ratio"] > 1.05
    assert flatness["verdict"] == "flat", flatness["processes"]
    processes = flatness["processes"]
    assert processes["persistent"] == 6 and abs(processes["persistent_growth_mib"]) < 10 and processes["reasons"] == [] and processes["over_limit"] == 0
    assert processes["second_quarter_median_count"] == 7 and processes["last_quarter_median_count"] == 8  # within the allowance of 1
    assert processes["largest_growth"]["growth_mib"] < 10 and processes["largest_growth"]["name"] in {name for name, _ in snapshots[-1].values()}
    assert flatness["rule"] == scale.PROCESS_RULE and "tree" in flatness["tree_rule"]
    line = scale.flatness_line(scale.StageResult(stage="first_stage", rows=1, memory_flatness=flatness))
    assert "per process: 6 persistent processes" in line and ": flat." in line and "Tree rule, not deciding" in line and line.endswith(": growing")


def test_process_flatness_growing_persistent_process():
    """One ShardGroupSearcher grows by 150 MiB (+21%) over the third quarter: growing, and it is named."""
    snapshots = steady_tree()
    for index in range(200, 400):
        name, rss = snapshots[index][(13, 2.0)]
        snapshots[index][(13, 2.0)] = (name, rss + 150.0 * min((index - 200) / 100, 1.0))
    flatness = scale.process_flatness(tree_of(snapshots)["seconds"], snapshots)
    assert flatness["verdict"] == "growing" and flatness["over_limit"] == 1
    largest = flatness["largest_growth"]
    assert largest["name"] == "ray::ShardGroupSearcher" and largest["pid"] == 13 and 140 < largest["growth_mib"] < 160 and largest["growth_ratio"] > 1.05
    assert flatness["reasons"][0].startswith("ray::ShardGroupSearcher (pid 13) +") and flatness["persistent_growth_mib"] > 100
    small = steady_tree()  # +20 MiB on the 60 MiB gcs_server: under 100 MiB, over 5%
    for index in range(200, 400):
        small[index][(11, 1.0)] = ("gcs_server", 80.0)
    assert scale.process_flatness(tree_of(small)["seconds"], small)["reasons"] == ["gcs_server (pid 11) +20.0 MiB (+33.3%)"]
    daemon = steady_tree()  # +8 MiB (+13%) on the 60 MiB gcs_server: over 5% but under the 16 MiB floor, so flat
    for index in range(200, 400):
        daemon[index][(11, 1.0)] = ("gcs_server", 68.0)
    assert scale.process_flatness(tree_of(daemon)["seconds"], daemon)["verdict"] == "flat"


def test_process_flatness_growing_number_of_processes():
    """A new process every 10 s that never ends (80 MiB each, each flat): no persistent process grows, the count does."""
    snapshots = steady_tree()
    for index in range(400):
        for number in range(index // 10 + 1):
            snapshots[index][(20_000 + number, 100.0 + number)] = ("ray::MapBatches(leaked)", 80.0)
    flatness = scale.memory_flatness(tree_of(snapshots), snapshots)
    processes = flatness["processes"]
    assert flatness["verdict"] == "growing" and processes["reasons"] == [f"live processes {processes['second_quarter_median_count']:g} -> {processes['last_quarter_median_count']:g}"]
    assert processes["last_quarter_median_count"] - processes["second_quarter_median_count"] == 20 and processes["over_limit"] == 0
    assert processes["persistent"] == 6 + 11  # the leaked processes from before the second quarter live through it: flat ones


def test_process_flatness_reused_pid_is_another_process():
    """pid 13 ends halfway and a new process takes pid 13 at once, far larger: two processes, neither persistent, not a growth."""
    snapshots = steady_tree()
    for index in range(200, 400):
        del snapshots[index][(13, 2.0)]
        snapshots[index][(13, 250.0)] = ("ray::MapBatches(first_stage)", 1500.0)
    flatness = scale.process_flatness(tree_of(snapshots)["seconds"], snapshots)
    assert flatness["verdict"] == "flat" and flatness["persistent"] == 5 and flatness["largest_growth"]["growth_mib"] < 10
    merged = [{(pid, 2.0 if pid == 13 else created): value for (pid, created), value in snapshot.items()} for snapshot in snapshots]
    assert scale.process_flatness(tree_of(merged)["seconds"], merged)["verdict"] == "growing"  # keyed by pid alone it would be a +800 MiB growth
    scale.write_process_csv(path := Path(os.environ.get("TMPDIR", "/tmp")) / f"reuse-{os.getpid()}.csv", tree_of(snapshots)["seconds"][198:202], snapshots[198:202])
    rows = list(csv.DictReader(path.open()))
    path.unlink()
    assert {(row["pid"], row["create_time"]) for row in rows if row["pid"] == "13"} == {("13", "2.0"), ("13", "250.0")}


def test_process_flatness_keeps_an_actor_pool_torn_down_at_the_end():
    """The actors end in the last quarter's last tenth (Ray Data shuts its actor pools down): still persistent, still judged."""
    snapshots = steady_tree()
    for index in range(390, 400):
        del snapshots[index][(12, 2.0)], snapshots[index][(13, 2.0)]
    flatness = scale.process_flatness(tree_of(snapshots)["seconds"], snapshots)
    assert flatness["verdict"] == "flat" and flatness["persistent"] == 6
    for index in range(300, 390):
        name, rss = snapshots[index][(12, 2.0)]
        snapshots[index][(12, 2.0)] = (name, rss + 300)
    assert scale.process_flatness(tree_of(snapshots)["seconds"], snapshots)["largest_growth"]["pid"] == 12
    for index in range(340, 400):  # gone for over half of the last quarter: not persistent
        snapshots[index].pop((12, 2.0), None)
    assert scale.process_flatness(tree_of(snapshots)["seconds"], snapshots)["persistent"] == 5


def test_process_flatness_too_short():
    for samples in (0, 1, 2):
        flatness = scale.process_flatness(list(np.arange(samples) * 0.2), steady_tree(samples))
        assert flatness["verdict"] == "too short" and flatness["persistent"] is None and flatness["largest_growth"] is None, samples
    assert scale.process_flatness([0.0, 0.0, 0.0], steady_tree(3))["verdict"] == "too short"  # no time spanned
    assert scale.process_flatness(list(np.arange(5) * 0.2), steady_tree(5))["verdict"] in ("flat", "growing")
    with pytest.raises(ValueError):
        scale.process_flatness([0.0, 1.0], steady_tree(3))
    result = scale.StageResult(stage="first_stage", rows=1, memory_flatness=scale.memory_flatness(tree_of(steady_tree(1)), steady_tree(1)))
    assert "per process: -: too short" in scale.flatness_line(result)


def test_process_csv_quotes_names_and_rounds():
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"names-{os.getpid()}.csv"
    scale.write_process_csv(path, [0.0, 1.25], [{(7, 3.14159): ("ray::MapBatches(a, b)", 12.345)}, {}])
    assert path.read_text().splitlines() == ["seconds,pid,name,rss_mib,create_time", '0.0,7,"ray::MapBatches(a, b)",12.3,3.14']
    path.unlink()


def test_memory_flatness_tells_flat_from_growing():
    rng = np.random.default_rng(0)
    seconds = np.arange(0, 600, 0.2)
    startup = np.minimum(seconds / 30, 1.0) * 3000  # loads in the first 30 s, outside the steady state
    flat = tree_flatness(series(seconds, 1000 + startup + rng.normal(0, 20, len(seconds))))
    assert flat["tree_verdict"] == "flat" and flat["samples"] == len(seconds)
    assert abs(flat["tree"]["growth_mib"]) < 10 and abs(flat["tree"]["slope_mib_per_min"]) < 5
    assert flat["driver"] == {"second_quarter_median_mib": 500.0, "last_quarter_median_mib": 500.0, "growth_mib": 0.0, "growth_ratio": 1.0, "slope_mib_per_min": 0.0}

    leaking = 1000 + startup + 15 * seconds / 60  # 15 MiB a minute: +75 MiB between the quarters' medians (225 s and 525 s), +1.8%
    growing = tree_flatness(series(seconds, leaking + 4000 * (seconds > 450)))  # and a jump in the last quarter
    assert growing["tree_verdict"] == "growing" and growing["tree"]["growth_mib"] > 100
    slow = tree_flatness(series(seconds, leaking))
    assert slow["tree_verdict"] == "flat"  # under 100 MiB and 5%: the rule's limits, the slope still shows it
    assert slow["tree"]["growth_mib"] == pytest.approx(75, abs=1) and slow["tree"]["slope_mib_per_min"] == pytest.approx(15, abs=0.1)
    small = tree_flatness(series(seconds, 200 + 15 * seconds / 60))  # +75 MiB on 256 MiB: under 100 MiB but +29%
    assert small["tree_verdict"] == "growing" and small["tree"]["growth_ratio"] > 1.05


def test_memory_flatness_of_very_short_series():
    empty = tree_flatness(series(np.array([]), np.array([])))
    assert empty["tree_verdict"] == "too short" and empty["samples"] == 0 and empty["tree"]["slope_mib_per_min"] is None
    one = tree_flatness(series(np.array([0.0]), np.array([800.0])))
    assert one["tree_verdict"] == "too short" and one["largest_worker"]["growth_mib"] is None
    two = tree_flatness(series(np.array([0.0, 0.2]), np.array([800.0, 900.0])))
    assert two["tree_verdict"] == "too short" and two["tree"]["slope_mib_per_min"] is None
    five = tree_flatness(series(np.arange(5) * 0.2, np.array([100.0, 800.0, 810.0, 815.0, 820.0]), worker=np.zeros(5)))
    assert five["tree_verdict"] == "flat" and five["tree"]["growth_mib"] == 17.5 and five["largest_worker"]["growth_ratio"] is None
    with pytest.raises(ValueError):
        scale.steady_state_growth([0.0, 1.0], [1.0])


def test_memory_series_stays_bounded_and_evenly_spaced():
    for samples in (1, 2, 599, 600, 601, 1_000, 100_003):
        memory = scale.MemorySeries(limit=600)
        for number in range(samples):
            memory.add((float(number), 0, 0, 0))
        points = [point[0] for point in memory.points()]
        assert len(points) <= 600 and points[0] == 0 and points[-1] == samples - 1, samples
        steps = set(np.diff(points[:-1]))  # the latest sample is kept whatever the stride
        assert len(steps) <= 1 and points == sorted(points), samples
        if samples >= 600:
            assert len(points) >= 300, samples
    with pytest.raises(ValueError):
        scale.MemorySeries(limit=1)


@pytest.mark.slow
def test_bench_scale_small_run_reports_every_stage(tmp_path):
    """10k documents, 2k queries, index-only at 50k vectors: every stage and metric in the JSON."""
    output = tmp_path / "scale.json"
    command = [sys.executable, "-m", "bench.scale", "--sizes", "5000,10000", "--queries", "2000", "--rerank-queries", "200", "--encode-docs", "5000",
               "--vectors", "50000", "--index-queries", "1000", "--recall-queries", "200", "--clusters", "100",
               "--workdir", str(tmp_path / "work"), "--output", str(output)]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=3600, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    payload = json.loads(output.read_text())
    assert [run["docs"] for run in payload["runs"]] == [5000, 10000]
    for run in payload["runs"]:
        assert set(run["stages"]) == set(scale.STAGES)
        for name, stage in run["stages"].items():
            assert stage["wall_s"] > 0 and stage["rows"] > 0 and stage["rows_per_s"] > 0 and stage["driver_peak_rss_bytes"] > 0, name
            assert stage["spilled_bytes"] >= 0, name
            if name != "plain_encode":
                assert stage["worker_peak_rss_bytes"] > 0 and stage["worker_peak_role"].startswith("ray::") and stage["bytes_written"] > 0, name
                assert 2 <= len(stage["memory_series"]["seconds"]) <= scale.MEMORY_POINTS and stage["memory_flatness"]["verdict"], name
                assert (tmp_path / f"scale-memory-{run['docs']}-{name}.csv").exists() and run["memory_csv"][name].endswith(f"-{name}.csv"), name
        assert run["embedding"]["pipeline_docs_per_s"] > 0 and run["embedding"]["plain_docs_per_s"] > 0 and run["embedding"]["ratio"] > 0
        assert run["text_fetch"]["texts"] == 200_000 and run["text_fetch"]["texts_per_second"] > 0
        assert run["summaries"]["build_index"]["indexed"] == run["docs"]
        assert run["summaries"]["first_stage"]["queries_run"] == 2000 and run["summaries"]["rerank"]["queries_run"] == 200
    assert set(payload["scaling"]) == set(scale.STAGES) and all(math.isfinite(k) for k in payload["scaling"].values())
    index_only = payload["index_only"]
    assert index_only["vectors"] == 50_000
    for key in ("build_s", "disk_bytes_per_vector", "ram_bytes_per_vector", "queries_per_s", "flat_queries_per_s", "speedup_vs_flat"):
        assert index_only[key] > 0, key
    assert 0.9 <= index_only["recall_at_100"] <= 1.0
    assert "index only" in payload["table"] and "scaling exponents" in payload["table"] and "memory over the first stage" in payload["table"]


@pytest.mark.slow
def test_gpu_script_dry_run_runs_every_step_on_cpu(tmp_path):
    """bench/gpu.sh --dry-run: bench.embed, bench.rerank and bench.scale (bundled MiniLM) at tiny sizes on CPU, JSON under $OUT."""
    if not (REPOSITORY.parent / "shared" / "datasets" / "scifact" / "corpus.jsonl").exists():
        pytest.skip("needs SciFact at ../shared/datasets/scifact")
    environment = {**os.environ, "OUT": str(tmp_path)}
    completed = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=3600, check=False)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "every step passed" in completed.stdout
    for name in ("embed-gpu.json", "rerank-gpu.json", "scale-gpu.json"):
        assert json.loads((tmp_path / name).read_text())["table"], name
    scale_run = json.loads((tmp_path / "scale-gpu.json").read_text())
    assert scale_run["arguments"]["model"] == "bundled" and scale_run["runs"][0]["docs"] == 300


def test_a_query_stage_is_judged_from_its_first_search():
    """An actor that grows while it loads (the first 40% of the stage, before any search) is start-up, not growth, once the
    stage is judged from the first sample at which a shard actor's title says it is searching; growth after that still is."""
    snapshots = steady_tree()
    for index, snapshot in enumerate(snapshots):  # loads for 160 s of 400: still loading through the rule's second quarter
        searching = 170 <= index <= 370
        snapshot[(12, 2.0)] = ("ray::ShardGroupSearcher.search" if searching and index % 2 else "ray::ShardGroupSearcher", 100.0 + 600.0 * min(index / 160, 1.0))
    tree = tree_of(snapshots)
    result = scale.StageResult(stage="first_stage", rows=1000, memory_series=tree, process_series=snapshots)
    result.memory_flatness = scale.memory_flatness(tree, snapshots)
    assert result.memory_flatness["verdict"] == "growing"
    assert scale.search_window(result) == (171.0, 369.0)
    scale.judge_steady_state(result)
    assert result.steady_from_s == 171.0 and result.memory_flatness["steady_from_s"] == 171.0
    assert result.memory_flatness["verdict"] == "flat" and result.memory_flatness["samples"] == 229
    assert result.extra["steady_queries_per_s"] == pytest.approx(1000 / 198)
    for index in range(300, 400):  # growth inside the steady state is still growth
        snapshots[index][(13, 2.0)] = ("ray::ShardGroupSearcher", 850.0)
    scale.judge_steady_state(result)
    assert result.memory_flatness["verdict"] == "growing"
    never = scale.StageResult(stage="first_stage", rows=10, memory_series=tree_of(steady_tree()), process_series=steady_tree())
    scale.judge_steady_state(never)
    assert never.extra["steady_queries_per_s"] is None and never.steady_from_s is None
