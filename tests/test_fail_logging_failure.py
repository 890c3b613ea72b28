"""fail_logging_failure.py: end to end against both targets, and its logging pieces in isolation."""
from __future__ import annotations

import contextvars
import inspect
import json
import logging
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from conftest import (ROOT, on_both_targets, assert_every_slot_has_a_control, assert_passed, clean_env, grade, lab_schemas, run_control,
                      run_script, scraped, write_solution)

import conftest
import fail_logging_failure as flf

SCRIPT = "fail_logging_failure.py"
IDS = ["storage", "correlation", "volume", "structured_parsing", "lost_on_kill"]


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def result(target, tmp_path_factory):
    name, env, _ = target
    return run_script(SCRIPT, env=env, tmp_path=tmp_path_factory.mktemp(f"logging-{name}"))


def test_every_scenario_passes_and_cleans_up(result, target):
    assert_passed(result, target[2], IDS)


DETECTORS = {"storage": ("metric", "LogEventsLost"), "correlation": ("python", "runs_whose_story_breaks"),
             "volume": ("metric", "LogErrorFlood"), "structured_parsing": ("metric", "LogEventsLost")}


@pytest.mark.parametrize("scenario_id", list(DETECTORS))  # lost_on_kill's: in its own file
def test_every_detector_fires_on_the_failure_and_is_quiet_after_the_fix(result, scenario_id):
    detection = result.scenario(scenario_id)["detection"]
    assert (detection["kind"], detection["check"]) == DETECTORS[scenario_id]
    assert detection["fired"] is True and detection["found_broken"], detection
    assert detection["quiet_after_fix"] is True and detection["found_after_fix"] == [], detection
    assert detection["runbook"]


def test_the_alerts_see_what_the_store_measured(result):
    """The metrics the alerts read are the figures the lesson measured in the store."""
    storage, parsing = result.scenario("storage"), result.scenario("structured_parsing")
    assert storage["detection"]["found_broken"] == [
        f"events emitted and not stored, {storage['measurements']['lost_before'] + 1}"]  # + the strict run's last
    assert parsing["detection"]["found_broken"] == [
        f"events emitted and not stored, {parsing['measurements']['lost_before']}"]
    volume = result.scenario("volume")
    assert volume["detection"]["found_broken"] == [f"{STORM_ERRORS} traceback rows, {STORM_DISTINCT_ERRORS} distinct errors"]


def dropped_by_series(folder) -> dict:
    """pipeline_log_records_dropped_total of every .prom file under folder, read with
    prometheus_client's own parser: {(phase, job, reason): value}."""
    dropped = {}
    for path in sorted(folder.rglob("*.prom")):
        scenario_id, phase = path.name.split(".")[:2]  # <scenario>.<phase>.prom
        for (name, labels), value in scraped(path.parent, scenario_id, phase).items():
            if name == "pipeline_log_records_dropped_total":
                dropped[(phase, dict(labels)["job"], dict(labels)["reason"])] = value
    return dropped


def test_the_dropped_counter_is_what_the_store_and_the_loader_measured(embedded_params, tmp_path):
    """The job's counter of dropped records, as Prometheus would scrape it, against the figures the
    lesson measured: emitted - stored for the failing store, the lines the loader set aside."""
    folder = tmp_path / "metrics"
    result = run_script(SCRIPT, "--only", "storage,structured_parsing", "--metrics", str(folder),
                        env=clean_env(), tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    storage = result.scenario("storage")["measurements"]
    parsing = result.scenario("structured_parsing")["measurements"]
    expected = {
        ("naive", "storage.default", "store_failed"): storage["emitted_before"] - storage["stored_before"],
        ("fixed", "storage.fixed", "store_failed"): storage["emitted_after"] - storage["stored_after"],
        ("naive", "parsing.naive", "format_failed"): parsing["lost_in_formatter"],
        ("naive", "parsing.naive", "unparseable"): parsing["lines_unparseable_before"],
        ("naive", "parsing.naive", "rejected_by_store"): parsing["rows_rejected_before"],
        ("fixed", "parsing.fixed", "format_failed"): parsing["dropped_after"],
        ("fixed", "parsing.fixed", "unparseable"): parsing["lines_unparseable_after"],
        ("fixed", "parsing.fixed", "rejected_by_store"): parsing["rows_rejected_after"],
    }
    if "fallback_file_dropped" in storage:  # a /dev/full to fail on
        expected[("naive", "storage.default", "file_failed")] = storage["fallback_file_dropped"]
    assert dropped_by_series(folder) == expected
    # the fixture's own figure, worked out independently of the run
    assert expected[("naive", "storage.default", "store_failed")] == EVENTS_PER_RUN - STORED_BEFORE_OUTAGE
    assert min(v for k, v in expected.items() if k[0] == "naive") > 0  # each reason really dropped some


def test_the_correlation_check_names_runs_that_have_no_row_at_all(result):
    """Under a global variable, the run that started first has not one row of its own: only a
    check that starts from the scheduler's runs can name it."""
    found = result.scenario("correlation")["detection"]["found_broken"]
    assert any(line.split(", ")[1] == "0" for line in found), found


# What the fixture dictates, worked out here independently of the script's own checks.
EVENTS_PER_RUN = 2 + flf.RECORDS // flf.EVENT_EVERY                  # 'job started' + progress + 'job finished'
STORED_BEFORE_OUTAGE = 1 + (flf.OUTAGE_AT - 1) // flf.EVENT_EVERY    # 'job started' + progress before the outage
EVENTS_PER_OVERLAPPING_RUN = 2 + flf.CHUNKS * flf.EVENTS_PER_CHUNK
POOL_EVENTS = 2 * flf.CHUNKS * flf.EVENTS_PER_CHUNK                   # both runs' events logged in pool threads
LEAK_EVENTS = 2 * (flf.EVENTS_PER_CHUNK + 1)                        # run A's task, then run B's, one pool thread; a "run finished" each
STORM_ERRORS = flf.STORM_RECORDS * 4 // 5
STORM_DISTINCT_ERRORS = 3                                             # ValueError, KeyError, ZeroDivisionError
TRICKY_EVENTS = Counter(flf.TRICKY[(i // 10) % len(flf.TRICKY)][0] for i in range(10, flf.FEED_EVENTS + 1, 10))
INHERITS_CONTEXT = getattr(sys.flags, "thread_inherit_context", 0)


def test_storage_loses_events_silently_and_then_kills_the_job(result):
    record = result.scenario("storage")
    m = record["measurements"]
    assert m["emitted_before"] == EVENTS_PER_RUN
    assert m["stored_before"] == STORED_BEFORE_OUTAGE  # the stall delays events, the outage loses them
    assert m["lost_before"] == EVENTS_PER_RUN - STORED_BEFORE_OUTAGE
    assert m["fallback_file_dropped"] == EVENTS_PER_RUN  # /dev/full refused every event
    # one '--- Logging error ---' block on stderr per record dropped, by either sink
    assert m["logging_errors_on_stderr"] == m["lost_before"] + m["fallback_file_dropped"]
    assert "--- Logging error ---" in record["sections"]["error"]
    assert m["strict_died_at_record"] == flf.OUTAGE_AT
    # run 1's store and file, run 2's store, the pre-flight write
    assert result.error_types("storage") == ["psycopg2.OperationalError", "OSError",
                                             "psycopg2.OperationalError", "OSError"]
    assert all("No space left on device" in e["message"] for e in record["observed_errors"] if e["type"] == "OSError")


def test_storage_replays_every_event_exactly_once_and_the_figures_reconcile(result):
    m = result.scenario("storage")["measurements"]
    assert m["emitted_after"] == m["stored_after"] == EVENTS_PER_RUN and m["lost_after"] == 0
    # every event emitted after the outage began can only have reached the store through the spool
    assert m["spooled_after"] >= EVENTS_PER_RUN - STORED_BEFORE_OUTAGE
    assert m["stored_live_after"] + m["spooled_after"] - m["spooled_already_stored"] == m["stored_after"]
    assert m["second_replay_inserted"] == 0
    assert m["stall_waiting_sessions"] >= 1  # the stall met a writer: the fault landed
    assert m["stall_insert_waited_s"] >= flf.STALL_S  # ... and held its INSERT the whole stall, as the server timed it


def test_correlation_counts_every_kind_of_mislabelled_row(result):
    m = result.scenario("correlation")["measurements"]
    assert m["global_other_runs_id"] == EVENTS_PER_OVERLAPPING_RUN  # one whole run relabelled by the other
    assert m["thread_local_no_run_id"] == POOL_EVENTS
    assert m["emitted_before"] == 3 * 2 * EVENTS_PER_OVERLAPPING_RUN + LEAK_EVENTS  # every row of the table
    if not INHERITS_CONTEXT:
        assert m["contextvar_plain_no_run_id"] == POOL_EVENTS
        assert m["contextvar_leaked_other_runs_id"] == flf.EVENTS_PER_CHUNK  # run B's task, run A's id
        assert m["lost_before"] == EVENTS_PER_OVERLAPPING_RUN + 2 * POOL_EVENTS + flf.EVENTS_PER_CHUNK
    assert m["emitted_after"] == m["stored_after"] == 2 * EVENTS_PER_OVERLAPPING_RUN and m["lost_after"] == 0
    assert m["leaked_after"] == 0


def test_volume_fixed_design_batches_and_keeps_true_counts(result):
    m = result.scenario("volume")["measurements"]
    assert m["naive_rows"] == m["naive_insert_statements"] == STORM_ERRORS  # one round trip per error
    assert m["redundant_rows_before"] == STORM_ERRORS - STORM_DISTINCT_ERRORS * flf.KEEP_PER_ERROR
    # the kept samples, plus one summary per distinct error
    assert m["fixed_rows"] == STORM_DISTINCT_ERRORS * (flf.KEEP_PER_ERROR + 1)
    assert m["fixed_insert_statements"] * 3 <= m["fixed_rows"]
    assert m["stall_waiting_sessions"] >= 1 and m["stall_insert_waited_s"] >= flf.STORM_STALL_S
    assert m["redundant_rows_after"] == 0 and m["errors_miscounted_after"] == 0
    assert m["fixed_bytes"] * 10 < m["naive_bytes"]


def test_structured_parsing_loses_each_tricky_kind_for_its_own_reason(result):
    assert result.error_types("structured_parsing") == [
        "TypeError", "json.decoder.JSONDecodeError", "psycopg2.errors.InvalidTextRepresentation",
        "psycopg2.errors.UntranslatableCharacter"]
    assert result.sqlstates("structured_parsing") == ["22P02", "22P05"]
    m = result.scenario("structured_parsing")["measurements"]
    assert m["emitted_before"] == flf.FEED_EVENTS
    assert m["lost_in_formatter"] == TRICKY_EVENTS["not_serializable"]  # TypeError on the Decimal
    refused_by_jsonb = TRICKY_EVENTS["nan"] + TRICKY_EVENTS["infinity"] + TRICKY_EVENTS["nul"]
    assert m["rows_rejected_before"] == refused_by_jsonb  # 22P02 for NaN and Infinity, 22P05 for \u0000
    # quotes, newlines, backslashes and raw tracebacks break the line; unicode alone survives
    broken = sum(TRICKY_EVENTS[k] for k in ("quote", "newline", "backslash", "traceback"))
    assert m["lines_unparseable_before"] > broken  # a newline or a traceback breaks one event into several lines
    assert m["lost_before"] == broken + TRICKY_EVENTS["not_serializable"] + refused_by_jsonb
    assert m["lines_unparseable_after"] == 0 and m["rows_rejected_after"] == 0 and m["dropped_after"] == 0
    assert m["emitted_after"] == m["stored_after"] == flf.FEED_EVENTS and m["lost_after"] == 0


# -- negative controls: the naive code back in each slot, under the same fault ------------------
CONTROLS = [
    ("storage", "store_handler", "did not hold the job up"),
    ("correlation", "run_id_holder", "overlapping runs:"),
    ("correlation", "submit_task", "nothing a task set reached the next run"),
    ("correlation", "find_broken_stories", "every run whose story broke was named by the check"),
    ("volume", "store_handler", "batched:"),
    ("volume", "storm_filter", "no redundant traceback row"),
    ("structured_parsing", "format_event", "one event per line"),
    ("structured_parsing", "read_lines", "read past its bad lines"),
]


@pytest.mark.parametrize("scenario_id, slot, claim", CONTROLS, ids=[f"{c[0]}-{c[1]}" for c in CONTROLS])
def test_negative_control_fails_with_the_claim_it_breaks(scenario_id, slot, claim, target, tmp_path):
    run_control(SCRIPT, scenario_id, slot, claim, target, tmp_path)


def test_every_slot_has_a_control():
    from test_lost_on_kill import CONTROLS as LOST_ON_KILL  # run in its own file

    assert_every_slot_has_a_control(SCRIPT, CONTROLS + [("lost_on_kill", *c) for c in LOST_ON_KILL])


def test_every_slot_has_a_contract_and_hints_and_prints_within_74_columns():
    """Prevention prints the slot functions indented by 6: each line fits 80 columns."""
    for f in [flf.STORE_HANDLER, *flf.CORRELATION_FIXES, *flf.VOLUME_FIXES, *flf.PARSING_FIXES]:
        assert f.contract and len(f.hints) == 2, f.slot
        for fn in (f.naive, f.fixed):
            wide = [ln for ln in inspect.getsource(fn).splitlines() if len(ln) > 74]
            assert not wide, (fn.__name__, wide)


# -- plausible wrong solutions, graded through the command line as a student runs them ----------
WRONG = {
    "a handler that blocks the job": ("storage", """
def store_handler(connect, spool):
    # retries and spools, but writes each record in the job's own thread
    return BatchingDatabaseHandler(connect, spool=spool, batch_size=1)
""", "did not hold the job up"),
    "a queue whose sink writes only when it is closed": ("storage", """
def store_handler(connect, spool):
    records = queue.SimpleQueue()
    handler = ListenedQueueHandler(records)
    handler.setFormatter(JsonFormatter())
    sink = BatchingDatabaseHandler(connect, spool=spool, batch_size=10 ** 6)
    sink.setFormatter(logging.Formatter("%(message)s"))
    handler.listener = logging.handlers.QueueListener(records, sink)  # never flushes on its own
    handler.listener.start()
    return handler
""", "the handler wrote while the job ran"),
    "a queue in front of a sink that does not batch": ("volume", """
def store_handler(connect, spool):
    records = queue.SimpleQueue()
    handler = ListenedQueueHandler(records)
    handler.setFormatter(JsonFormatter())
    sink = DatabaseHandler(connect)  # one INSERT and one COMMIT per record
    sink.setFormatter(logging.Formatter("%(message)s"))
    handler.listener = logging.handlers.QueueListener(records, sink)
    handler.listener.start()
    return handler


def storm_filter(keep):
    return ErrorStormFilter(keep=keep)
""", "batched:"),
    "a thread-local instead of a contextvar": ("correlation", """
def run_id_holder():
    return ThreadLocalRunId()


def submit_task(pool, fn, *args):
    return pool.submit(contextvars.copy_context().run, fn, *args)


def find_broken_stories(conn):
    return runs_whose_story_breaks(conn)
""", "overlapping runs:"),
    "a check that starts from the log, not from the scheduler's runs": ("correlation", """
def run_id_holder():
    return run_id_holder_contextvar()


def submit_task(pool, fn, *args):
    return submit_in_context(pool, fn, *args)


def find_broken_stories(conn):
    # a run with no row of its own never shows up
    return db.rows(conn, \"\"\"
        SELECT coalesce(l.correlation_id, '(no run id)'), count(*),
               max((l.fields->>'events')::int)
        FROM pipeline_log l
        LEFT JOIN job_runs r ON r.run_id = l.correlation_id
        WHERE NOT coalesce(r.acknowledged, false)
        GROUP BY 1
        HAVING count(*) IS DISTINCT FROM max((l.fields->>'events')::int)\"\"\")
""", "every run whose story broke was named by the check"),
    "json.dumps without a default for what JSON cannot encode": ("structured_parsing", """
def format_event(record):
    return json.dumps({"time": event_time(record), "level": record.levelname, "logger": record.name,
                       "message": record.getMessage(),
                       "correlation_id": getattr(record, "correlation_id", None),
                       "fields": event_fields(record)})


def read_lines(path):
    return read_lines_tolerant(path)
""", "no record dropped by the formatter"),
    "a reader that trusts Python's json": ("structured_parsing", """
def format_event(record):
    return format_event_json(record)


def read_lines(path):
    good, quarantine = [], []
    for n, line in enumerate(open(path, encoding="utf-8", newline="\\n"), 1):
        try:
            json.loads(line)
            good.append((n, line.rstrip("\\n")))
        except ValueError as exc:
            quarantine.append((n, exc, line))
    return good, quarantine
""", "every line the reader passed loads into jsonb"),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_wrong_solution_fails_with_the_claim_it_breaks(wrong, target, tmp_path):
    _, env, params = target
    scenario_id, code, claim = WRONG[wrong]
    write_solution(tmp_path, SCRIPT, scenario_id, code)
    result = grade(SCRIPT, scenario_id, tmp_path, env)
    record = result.scenario(scenario_id)
    assert result.returncode == 1 and record["mode"] == "exercise" and "NOT YET" in result.stdout
    assert record["triggered"] is True and record["recovered"] is False and record["cleaned"] is True
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert any(claim in c for c in failed), failed
    assert not any(c.startswith("unexpected ") for c in failed), failed  # graded, not crashed
    assert lab_schemas(params, result.journal["run_id"]) == []


def test_import_runs_nothing():
    """Importing the script (for these unit tests) must not run, print, log or start anything."""
    probe = ("import logging, threading, fail_logging_failure as m; "
             "assert threading.active_count() == 1; assert not logging.root.handlers; "
             "assert not any(isinstance(x, logging.Logger) and x.handlers "
             "for x in logging.root.manager.loggerDict.values())")
    done = subprocess.run([sys.executable, "-c", probe], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


# -- the JSON formatter -------------------------------------------------------------------------------
def make_record(message="hello", fields=None, exc_info=None, args=None, **extra):
    record = logging.LogRecord("faillab.test", logging.INFO, __file__, 1, message, args, exc_info)
    record.fields = fields or {}
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def refuse(name):
    raise ValueError(name)


def formatted(record) -> tuple[str, dict]:
    line = flf.format_event_json(record)
    assert "\n" not in line and "\r" not in line
    return line, json.loads(line, parse_constant=refuse)  # strict, like jsonb


def test_formatter_maps_nan_and_infinities_to_strings():
    _, event = formatted(make_record(fields={"ratio": float("nan"), "hi": float("inf"), "lo": [float("-inf")]}))
    assert event["fields"] == {"ratio": "NaN", "hi": "Infinity", "lo": ["-Infinity"]}


def test_formatter_keeps_records_with_non_serializable_fields():
    class Opaque:
        def __str__(self):
            raise RuntimeError("no text either")

    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    _, event = formatted(make_record(fields={"amount": Decimal("12.50"), "at": when, "tags": {"b", "a"},
                                             "opaque": Opaque()}))
    assert event["fields"]["amount"] == "12.50"
    assert event["fields"]["at"] == when.isoformat()
    assert event["fields"]["tags"] == ["a", "b"]
    assert event["fields"]["opaque"] == "<unprintable Opaque>"


@pytest.mark.parametrize("message", ['customer "ACME"', "line 1\nline 2\r\nline 3", r"C:\data\in.csv", "tab\there"])
def test_formatter_writes_one_line_that_round_trips(message):
    _, event = formatted(make_record(message))
    assert event["message"] == message


def test_formatter_round_trips_unicode():
    line, event = formatted(make_record("café, Zürich, 東京, \u2028 separator"))
    assert event["message"] == "café, Zürich, 東京, \u2028 separator"
    assert len(line.split("\n")) == 1


def test_json_safe_names_each_non_finite_float():
    """The feed holds NaN and +Infinity only: -Infinity is checked here."""
    assert [flf.json_safe(x) for x in (float("nan"), float("inf"), float("-inf"), -1.5)] == [
        "NaN", "Infinity", "-Infinity", -1.5]


def test_formatter_makes_nul_loadable():
    _, event = formatted(make_record("a\x00b", fields={"code": "AB\x00", "k\x00": ["\x00"]}))
    assert event["message"] == "a\ufffdb"
    assert event["fields"] == {"code": "AB\ufffd", "k\ufffd": ["\ufffd"]}


def test_formatter_never_drops_a_record_it_cannot_format():
    """A message whose arguments do not fit raises inside getMessage(): the event is still written."""
    _, event = formatted(make_record("%d rows", event_id="run-1-00007", args=("many",)))
    assert event["message"] == "%d rows" and event["fields"]["event_id"] == "run-1-00007"
    assert event["fields"]["format_error"].startswith("TypeError")


def test_allow_nan_false_is_a_tripwire_whose_firing_loses_nothing(monkeypatch):
    """Without json_safe a NaN reaches json.dumps: allow_nan=False raises, and the formatter
    writes the event with the error instead of letting logging drop it."""
    monkeypatch.setattr(flf, "json_safe", lambda value: value)
    _, event = formatted(make_record(fields={"ratio": float("nan")}, event_id="run-1-00008"))
    assert event["fields"]["event_id"] == "run-1-00008"
    assert event["fields"]["format_error"].startswith("ValueError: Out of range float values")


def test_formatter_puts_the_exception_in_a_field():
    try:
        int("x")
    except ValueError:
        record = make_record("failed", exc_info=sys.exc_info(), event_id="run-1-00001", correlation_id="run-1")
    _, event = formatted(record)
    exc = event["fields"]["exception"]
    assert exc["type"] == "ValueError"
    assert "invalid literal" in exc["message"]
    assert exc["traceback"].startswith("Traceback") and "\n" in exc["traceback"]
    assert event["fields"]["event_id"] == "run-1-00001"
    assert event["correlation_id"] == "run-1"
    assert set(event) == {"time", "level", "logger", "message", "correlation_id", "fields"}


def test_naive_formatter_really_breaks():
    naive = flf.format_event_concat
    with pytest.raises(json.JSONDecodeError):
        json.loads(naive(make_record('customer "ACME"')))
    with pytest.raises(TypeError):
        naive(make_record(fields={"amount": Decimal("1")}))
    assert "NaN" in naive(make_record(fields={"ratio": float("nan")}))
    assert "Infinity" in naive(make_record(fields={"rate": float("inf")}))
    assert json.loads(naive(make_record(fields={"code": "A\x00"})))["fields"]["code"] == "A\x00"  # jsonb refuses it


# -- the correlation filter across threads ----------------------------------------------------------
class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def captured():
    """A dedicated logger with the correlation filter (ContextVar); (logger, handler); torn down after."""
    handler = Capture()
    with flf.job_logger("test", handler) as log:
        yield log, handler


def test_filter_gives_each_thread_its_own_run_id(captured):
    log, handler = captured
    barrier = threading.Barrier(2)

    def run(run_id):
        flf.CORRELATION_ID.set(run_id)
        barrier.wait(timeout=5)  # both ids are set before either logs
        for n in range(5):
            log.info("step %d", n, extra={"run": run_id})

    threads = [threading.Thread(target=run, args=(r,)) for r in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(handler.records) == 10
    assert all(r.correlation_id == r.run for r in handler.records)


def test_copied_context_reaches_pool_threads(captured):
    log, handler = captured

    def task(n):
        log.info("task %d", n)

    def run(run_id, submit):
        flf.CORRELATION_ID.set(run_id)
        with ThreadPoolExecutor(2) as pool:
            for future in [submit(pool, task, n) for n in range(4)]:
                future.result()

    contextvars.copy_context().run(run, "copied", flf.submit_in_context)
    assert [r.correlation_id for r in handler.records] == ["copied"] * 4
    handler.records.clear()
    contextvars.copy_context().run(run, "plain", flf.submit_plain)
    if not getattr(sys.flags, "thread_inherit_context", 0):
        assert [r.correlation_id for r in handler.records] == [None] * 4
    assert flf.CORRELATION_ID.get() is None  # nothing leaked into this thread


def test_a_pool_thread_shares_its_context_between_tasks():
    """What pool.submit really does: each task runs in the worker thread's own context, so a value
    one task sets is there for the next; a copied context keeps it in the task."""
    var = contextvars.ContextVar("probe", default=None)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(var.set, "A").result()
        assert pool.submit(var.get).result() == "A"  # leaked into a later task
    with ThreadPoolExecutor(1) as pool:
        flf.submit_in_context(pool, var.set, "A").result()
        assert flf.submit_in_context(pool, var.get).result() is None
    assert var.get() is None


def in_another_thread(fn):
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def test_naive_holders_lose_or_mix_ids():
    local = flf.ThreadLocalRunId()
    local.set("main")
    seen = []
    in_another_thread(lambda: seen.append(local.get()))
    assert seen == [None]  # another thread does not see this thread's id
    shared = flf.GlobalRunId()
    shared.set("A")
    in_another_thread(lambda: shared.set("B"))
    assert shared.get() == "B"  # another thread's run overwrote it for everyone


def test_explicit_correlation_id_is_kept():
    record = make_record(correlation_id="explicit")
    token = flf.CORRELATION_ID.set("ambient")
    try:
        flf.CorrelationFilter().filter(record)
    finally:
        flf.CORRELATION_ID.reset(token)
    assert record.correlation_id == "explicit"


# -- the error storm filter and the tolerant reader ---------------------------------------------------
def raise_value_error(i):
    raise ValueError(f"record {i} is bad")


def test_error_key_ignores_the_message_but_not_the_place():
    keys = set()
    for i in range(3):
        try:
            raise_value_error(i)
        except ValueError as exc:
            keys.add(flf.error_key(exc))
    try:
        raise ValueError("elsewhere")
    except ValueError as exc:
        other = flf.error_key(exc)
    assert len(keys) == 1 and other not in keys


def test_storm_filter_keeps_samples_and_counts_the_rest():
    storm = flf.ErrorStormFilter(keep=3)
    passed = 0
    for i in range(10):
        try:
            raise_value_error(i)
        except ValueError:
            passed += storm.filter(make_record(exc_info=sys.exc_info()))
    assert storm.filter(make_record("plain info"))
    assert passed == 3
    [(key, suppressed)] = storm.drain()
    assert key.startswith("ValueError at") and suppressed == 7
    assert storm.drain() == []


def test_storm_filter_caps_distinct_errors():
    storm = flf.ErrorStormFilter(keep=1, max_distinct=2)
    for exc_type in (ValueError, KeyError, TypeError, OSError):
        try:
            raise exc_type("x")
        except Exception:
            record = make_record(exc_info=sys.exc_info())
            storm.filter(record)
    assert len(storm.seen) == 3 and storm.seen[flf.ErrorStormFilter.OVER_CAP] == 2


def test_tolerant_reader_quarantines_bad_lines_with_numbers(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"broken\n\n{"ratio": NaN}\n{"b": 2}\n{"c": ["\\u0000"]}\n'
                    '{"d": "C:\\\\u0000"}\n', encoding="utf-8")
    good, quarantine = flf.read_lines_tolerant(path)
    assert [n for n, _ in good] == [1, 5, 7]  # line 7 holds a backslash and the text u0000, not a NUL
    assert [n for n, _, _ in quarantine] == [2, 4, 6]
    parsed, unparseable = flf.python_parses(path)  # what Python's json accepts
    assert [n for n, _ in parsed] == [1, 4, 5, 6, 7] and unparseable == [2]
    with pytest.raises(json.JSONDecodeError):
        flf.read_lines_naive(path)



def test_a_fault_that_does_not_land_fails_fast_with_its_claim(target, tmp_path):
    """FAILLAB_NO_FAULTS=1 makes the proxy's outage and the kill no-ops: storage must stop on the
    claim that the store refused events and lost_on_kill on the claim that the kill landed, not
    pass and not hang; the other scenarios inject no switchable fault (their stall is a real lock)
    and still pass."""
    result = run_script(SCRIPT, env={**target[1], "FAILLAB_NO_FAULTS": "1"}, tmp_path=tmp_path, timeout=180)
    assert result.returncode == 1 and result.journal is not None, result.stderr[-3000:]
    records = {r["id"]: r for r in result.journal["scenarios"]}
    assert list(records) == IDS
    record = records["storage"]
    assert record["status"] == "failed" and record["triggered"] is False and record["cleaned"] is True
    assert record["reason"] == "stopped early: run 1: the log store refused events"
    killed = records["lost_on_kill"]  # its SIGKILL is disarmed too: it stops on that claim
    assert killed["status"] == "failed" and killed["triggered"] is False and killed["cleaned"] is True
    assert killed["reason"].startswith("stopped early: the kill landed")
    assert all(records[i]["status"] == "passed" for i in IDS if i not in ("storage", "lost_on_kill")), \
        {i: r.get("reason") for i, r in records.items()}
    assert lab_schemas(target[2], result.journal["run_id"]) == []


def test_a_handler_that_retries_forever_is_stopped_and_graded_failed(target, tmp_path):
    """Retrying each record until the store is back, in the job's thread: the outage lasts until
    the job ends, so it never returns. The run's call limit stops it; the grade names the claims."""
    _, env, params = target
    write_solution(tmp_path, SCRIPT, "storage", """
class Stubborn(logging.Handler):
    def __init__(self, connect):
        super().__init__()
        self.inner = DatabaseHandler(connect)

    def emit(self, record):
        while True:  # until the store takes it
            try:
                self.inner.write([JsonFormatter().format(record)])
                return
            except psycopg2.Error:
                time.sleep(0.05)

    def close(self):
        self.inner.close()
        super().close()


def store_handler(connect, spool):
    return Stubborn(connect)
""")
    result = run_script(SCRIPT, "--exercise", "storage", "--call-limit", "3", env=env, tmp_path=tmp_path,
                        timeout=120)
    record = result.scenario("storage")
    assert result.returncode == 1 and record["cleaned"] is True and record["recovered"] is False
    assert "common.fixes.TimeLimitExceeded" in [e["type"] for e in record["observed_errors"]]
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert any(c.startswith("the job finished all") for c in failed), failed
    assert lab_schemas(params, result.journal["run_id"]) == []


def test_a_formatter_that_never_returns_costs_one_limit_and_is_graded_failed(target, tmp_path):
    _, env, params = target
    write_solution(tmp_path, SCRIPT, "structured_parsing", """
def format_event(record):
    while True:
        pass


def read_lines(path):
    return read_lines_tolerant(path)
""")
    result = run_script(SCRIPT, "--exercise", "structured_parsing", "--call-limit", "2", env=env,
                        tmp_path=tmp_path, timeout=120)  # 350 records: one limit, not 350
    record = result.scenario("structured_parsing")
    assert result.returncode == 1 and record["cleaned"] is True and record["recovered"] is False
    failed = [c["claim"] for c in record["checks"] if not c["ok"]]
    assert any("no record dropped by the formatter" in c for c in failed), failed
    assert record["measurements"]["dropped_after"] == flf.FEED_EVENTS
    assert lab_schemas(params, result.journal["run_id"]) == []


# -- the checks checked: the recovered state broken just before a claim looks at it ---------------
BREAK_BEFORE = '''
def break_before(owner, name, when, *statements, act=None):
    """Break the state once, just before the first call of owner.name that `when` picks: run
    `statements` on the call's connection (%(run)s: its run id), or `act` on its arguments."""
    real, done = getattr(owner, name), []

    def broken(*args):
        if not done and when(*args):
            done.append(True)
            if act is not None:
                act(*args)
            if statements:
                with args[0].cursor() as cur:
                    for statement in statements:
                        cur.execute(statement, {"run": args[1] if isinstance(args[1], str) else None})
                args[0].commit()
        return real(*args)
    setattr(owner, name, broken)
'''


def run_patched(tmp_path, scenario_id: str, patch: str, env: dict):
    """One scenario of the lesson, run with break_before() at hand and `patch` applied to it."""
    return conftest.run_patched(SCRIPT, scenario_id, BREAK_BEFORE + patch, env, tmp_path)


FIXED_RUN = "lambda conn, run_id: run_id.startswith('fixed-')"  # the call that reads the fixed run


def querying(text: str) -> str:
    """A `when` that picks the db.rows call whose query holds `text`."""
    return f"lambda conn, query, *params: {text!r} in str(query)"


def before(call: str, when: str, *statements: str) -> str:
    """A patch that runs `statements` just before `call` (lab.f or db.f) picked by `when`."""
    owner, name = call.split(".")
    return f"break_before({owner}, {name!r}, {when}, " + ", ".join(map(repr, statements)) + ")"


def last_spooled_line(change: str) -> str:
    """A patch that edits the spool file (its last event line) just before the lesson reads it."""
    return f"""
def edit(spool):
    lines = [x for x in spool.read_text(encoding="utf-8").split("\\n") if x.strip()]
    spool.write_text("".join(x + "\\n" for x in {change}), encoding="utf-8")
break_before(lab, "spooled_event_ids", lambda spool: True, act=edit)"""


def copy_row(row: str) -> str:
    return ("DROP INDEX pipeline_log_event_id; INSERT INTO pipeline_log (logged_at, level, logger, message, "
            "correlation_id, fields) SELECT logged_at, level, logger, message, correlation_id, fields "
            f"FROM pipeline_log WHERE id = {row}")


RUN_ROW = "(SELECT max(id) FROM pipeline_log WHERE correlation_id = %(run)s)"
SUMMARY = "(SELECT min(id) FROM pipeline_log WHERE fields ? 'suppressed')"
FIXED_ROWS, STORM_ROWS = querying("IN (%s, %s) GROUP BY 1, 2"), querying("count(*) FILTER (WHERE fields ? ")
DELETE_RUN_ROW = f"DELETE FROM pipeline_log WHERE id = {RUN_ROW}"
RELABEL = ("UPDATE pipeline_log SET correlation_id = correlation_id || '-other' WHERE id = (SELECT min(id) "
           "FROM pipeline_log WHERE fields->>'design' = 'fixed, overlapping')")
UNACKNOWLEDGE = ("UPDATE job_runs SET acknowledged = false WHERE run_id = (SELECT min(run_id) FROM job_runs "
                 "WHERE acknowledged)")
ONE_SHORT = ("UPDATE pipeline_log SET fields = jsonb_set(fields, '{suppressed}', "
             f"to_jsonb((fields->>'suppressed')::int - 1)) WHERE id = {SUMMARY}")
UNQUOTE = ("UPDATE pipeline_log SET message = replace(message, '\"', '') "
           "WHERE correlation_id = %(run)s AND fields->>'kind' = 'quote'")
BROKEN_STATES = {  # the scenario, the patch that breaks its state just before a check, the claim that must fail
    "storage, an event missing after the replay": (
        "storage", before("lab.run_totals", FIXED_RUN, DELETE_RUN_ROW), "none lost: stored == emitted"),
    "storage, an event doubled after the replay": (
        "storage", before("lab.run_totals", FIXED_RUN, copy_row(RUN_ROW)), "no duplicate:"),
    "storage, a spooled event lost": ("storage", last_spooled_line("lines[:-1]"), "each event was stored or spooled"),
    "storage, a spooled event doubled": (
        "storage", last_spooled_line("lines + lines[-1:]"), "each event was stored or spooled"),
    "correlation, a fixed row with the other run's id": (
        "correlation", before("db.rows", FIXED_ROWS, RELABEL), "overlapping runs:"),
    "correlation, a fixed row doubled": ("correlation", before("db.rows", FIXED_ROWS, copy_row(
        "(SELECT max(id) FROM pipeline_log WHERE fields->>'design' = 'fixed, one pool thread')")),
        "events is one row, no more"),
    "correlation, a named run left unacknowledged": (
        "correlation", before("db.rows", querying("SELECT DISTINCT l.fields"), UNACKNOWLEDGE),
        "every run whose story broke was named by the check and acknowledged"),
    "volume, a summary missing": (
        "volume", before("db.rows", STORM_ROWS, f"DELETE FROM pipeline_log WHERE id = {SUMMARY}"),
        "each with its true count"),
    "volume, a suppressed count one short": ("volume", before("db.rows", STORM_ROWS, ONE_SHORT),
                                             "each with its true count"),
    "volume, a traceback sample doubled": ("volume", before("db.rows", STORM_ROWS, copy_row(
        "(SELECT max(id) FROM pipeline_log WHERE fields ? 'exception')")), "no redundant traceback row"),
    "structured_parsing, an event missing after the load": (
        "structured_parsing", before("lab.run_totals", FIXED_RUN, DELETE_RUN_ROW), "events loaded into jsonb"),
    "structured_parsing, a quote lost on the way": (
        "structured_parsing", before("lab.run_totals", FIXED_RUN, UNQUOTE), "survive the round trip exactly"),
    "correlation, a row of the story missing": (
        "correlation", before("db.rows", querying("to_char(logged_at"),
                              "DELETE FROM pipeline_log WHERE id IN (SELECT max(id) FROM pipeline_log "
                              "WHERE fields->>'design' = 'fixed, overlapping' GROUP BY correlation_id)"),
        "one query tells one run's whole story"),
    "correlation, a row with no run id logged after the check": ("correlation", """
checks = []
def second_check(conn, query, *params):  # the check's run that names the runs to acknowledge
    checks.extend(["WITH story AS" in str(query)] * ("WITH story AS" in str(query)))
    return len(checks) == 2
break_before(db, "rows", second_check, "INSERT INTO pipeline_log (level, logger, message) VALUES "
                                       "('INFO', 'elsewhere', 'a row no run can claim')")""",
        "rows moved, the rows with no run id"),
}


@pytest.mark.parametrize("name, target", on_both_targets(BROKEN_STATES, lambda n: BROKEN_STATES[n][0]),
                         indirect=["target"])
def test_a_recovery_check_fails_when_the_state_it_guards_is_broken(name, target, tmp_path):
    scenario_id, patch, claim = BROKEN_STATES[name]
    result = run_patched(tmp_path, scenario_id, patch, target[1])
    assert_fails_on_its_claim(result, scenario_id, claim)


def assert_fails_on_its_claim(result, scenario_id: str, claim: str) -> None:
    """The run is red on the named recovery claim, with the failure shown and everything cleaned."""
    record = result.scenario(scenario_id)
    assert result.returncode == 1 and record["triggered"] is True and record["cleaned"] is True, \
        result.stdout[-3000:] + result.stderr[-3000:]
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "recovered" and not c["ok"]]
    assert any(claim in c for c in failed), failed
    assert not any(c.startswith(("unexpected ", "stopped early")) for c in failed), failed


LINE_WRITTEN_TWICE = '''
real_write_feed = lab.write_feed
def last_line_twice(s, name, format_event):  # the fixed feed's last line written again
    report, path, sink, stderr = real_write_feed(s, name, format_event)
    if name == "fixed":
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines + lines[-1:]), encoding="utf-8")
    return report, path, sink, stderr
lab.write_feed = last_line_twice
'''


def test_a_line_written_twice_is_not_one_event_per_line(embedded_params, tmp_path):
    """The store skips the second copy (ON CONFLICT), so only the count of lines read sees it."""
    result = run_patched(tmp_path, "structured_parsing", LINE_WRITTEN_TWICE, clean_env())
    assert_fails_on_its_claim(result, "structured_parsing", "one event per line")


# Bugs of the recovery's own steps: a pre-flight that never writes, a replay that skips a line.
RECOVERY_BUGS = {
    "a pre-flight that only opens the file": (
        "lab.check_spool = lambda path: open(path, 'a', encoding='utf-8').close()",
        "it is ENOSPC (errno 28): the full disk is found before the job starts"),
    "a replay that skips the spool's last line": ("""
real_replay = lab.replay_spool
def replay_but_the_last(conn, spool):
    lines = spool.read_text(encoding="utf-8").rstrip("\\n").split("\\n")
    short = spool.with_name("short.jsonl")
    short.write_text("\\n".join(lines[:-1]) + "\\n", encoding="utf-8")
    try:
        return real_replay(conn, short)
    finally:
        short.unlink()
lab.replay_spool = replay_but_the_last""", "the replay inserted exactly the"),
}


@pytest.mark.parametrize("bug", list(RECOVERY_BUGS))
def test_a_bug_in_a_recovery_step_fails_its_claim(bug, embedded_params, tmp_path):
    patch, claim = RECOVERY_BUGS[bug]
    assert_fails_on_its_claim(run_patched(tmp_path, "storage", patch, clean_env()), "storage", claim)


# A stall that misses: the lock held 0.05 s instead of the 1 s the scenario states, or never
# taken. The server times the INSERT that waited on it, so the claim of the whole stall fails.
SHORT_STALL = """
real_stall_store, stalls = lab.stall_store, []
def short_stall(s, seconds):
    stalls.append(seconds)
    return real_stall_store(s, 0.05 if len(stalls) == {which} else seconds)
lab.stall_store = short_stall"""
NO_STALL = """
def no_stall(s, seconds):  # no lock taken: nothing for an INSERT to wait on
    stall = lab.Stall(seconds, settled=s.event())
    stall.settled.set()
    return stall
lab.stall_store = no_stall"""
STALLS_THAT_MISS = {  # the scenario, the patch, the claim that must fail
    "volume, a 0.05 s stall": ("volume", SHORT_STALL.format(which=1), "the stall landed: an INSERT waited"),
    "volume, no stall": ("volume", NO_STALL, "the stall landed: an INSERT waited"),
    "storage, a 0.05 s stall in the fixed run": (  # the second stall: run 1 still meets the whole one
        "storage", SHORT_STALL.format(which=2), "the handler wrote while the job ran: an INSERT waited"),
}


@pytest.mark.parametrize("name", list(STALLS_THAT_MISS))
def test_a_stall_shorter_than_stated_fails_the_claim_of_the_wait(name, embedded_params, tmp_path):
    scenario_id, patch, claim = STALLS_THAT_MISS[name]
    result = run_patched(tmp_path, scenario_id, patch, clean_env())
    assert_fails_on_its_claim(result, scenario_id, claim)
    if scenario_id == "volume":
        waited = result.scenario("volume")["measurements"]["stall_insert_waited_s"]
        assert waited < flf.STORM_STALL_S / 2, waited  # the server saw the short wait, not the stated one


def test_storage_run_1_fails_its_trigger_when_its_stall_is_short(embedded_params, tmp_path):
    """Run 1's stall cut to 0.05 s: the trigger's claim of the whole stall fails, measured."""
    result = run_patched(tmp_path, "storage", SHORT_STALL.format(which=1), clean_env())
    record = result.scenario("storage")
    assert result.returncode == 1 and record["triggered"] is False and record["cleaned"] is True
    failed = [c["claim"] for c in record["checks"] if c["phase"] == "triggered" and not c["ok"]]
    assert any(c.startswith("run 1: an INSERT waited") for c in failed), failed
    assert record["measurements"]["naive_stall_insert_waited_s"] < flf.STALL_S / 2
