"""The ledger: a document's fate from the facts of one attempt, as a table (milliseconds)."""

from __future__ import annotations

import ast
import inspect
import shutil
from pathlib import Path

import pytest

from pipeline.ledger import POLICY, DocFacts, RetryPolicy, decide, retry_in_run
from pipeline.records import DocStatus, Stage, StageError

BAD = StageError(Stage.RASTERIZE, "encrypted_pdf", "needs a password", retryable=False)
NET = StageError(Stage.SOURCES, "unreadable", "ConnectionResetError", retryable=True)
CRASH = StageError(Stage.RASTERIZE, "worker_crashed", "worker died (SIGKILL)", retryable=True)
TIMEOUT = StageError(Stage.TIMEOUT, "document_timeout", "stopped after 60 s", retryable=True)
OOM = StageError(Stage.INFERENCE, "out_of_memory", "CUDA out of memory", retryable=True)
GEN = StageError(Stage.INFERENCE, "generation_failed", "bad output", retryable=False)
PAGE = StageError(Stage.RASTERIZE, "corrupt_image", "frame 2", retryable=False)

OK, PARTIAL, ERROR, DUP = DocStatus.OK, DocStatus.PARTIAL, DocStatus.ERROR, DocStatus.DUPLICATE

# facts -> (status, error type, pages ok, pages failed, pages kept, final, retried within the run)
TABLE = [
    ("clean", DocFacts(1, pages_ok=3), (OK, None, 3, 0, True, True, False)),
    ("bad input, recorded once", DocFacts(1, error=BAD), (ERROR, "encrypted_pdf", 0, 0, True, True,
                                                                          False)),
    ("a bad page: partial, final", DocFacts(2, pages_ok=2, pages_failed=1, page_errors=(PAGE,)),
     (PARTIAL, None, 2, 1, True, True, False)),
    ("duplicate", DocFacts(1, duplicate=True), (DUP, None, 0, 0, True, True, False)),
    ("storage blip, run 1: next run", DocFacts(1, error=NET), (ERROR, "unreadable", 0, 0, False,
                                                                               False, True)),
    ("storage blip, run 2: next run", DocFacts(2, error=NET), (ERROR, "unreadable", 0, 0, False,
                                                                               False, True)),
    ("storage blip, last run: final", DocFacts(3, error=NET), (ERROR, "unreadable", 0, 0, True, True,
                                                                               True)),
    ("worker lost: the pool retried it", DocFacts(1, error=CRASH), (ERROR, "worker_crashed", 0, 0,
                                                                                    False, False, False)),
    ("timed out: final at once, the pages it got stand", DocFacts(1, error=TIMEOUT, pages_ok=2),
     (PARTIAL, "document_timeout", 2, 0, True, True, False)),
    ("timed out with no page: error, final", DocFacts(1, error=TIMEOUT), (ERROR, "document_timeout", 0, 0, True,
                                                                          True, False)),
    ("timed out again when asked (--retry-timeouts): final", DocFacts(2, error=TIMEOUT, pages_ok=2),
     (PARTIAL, "document_timeout", 2, 0, True, True, False)),
    ("model failed one page for good", DocFacts(1, pages_ok=3, model_failed=1, page_errors=(GEN,)),
     (PARTIAL, "page_errors", 2, 1, True, True, False)),
    ("model failed every page for good", DocFacts(1, pages_ok=2, model_failed=2, page_errors=(GEN, GEN)),
     (ERROR, "page_errors", 0, 2, True, True, False)),
    ("out of memory on a page: next run", DocFacts(1, pages_ok=3, model_failed=1, page_errors=(OOM,)),
     (ERROR, "page_errors", 0, 0, False, False, True)),
    ("out of memory, last run: partial", DocFacts(3, pages_ok=3, model_failed=1, page_errors=(OOM,)),
     (PARTIAL, "page_errors", 2, 1, True, True, True)),
    ("every page failed in preparation", DocFacts(1, pages_failed=2, page_errors=(PAGE, PAGE),
                                                  error=StageError(Stage.RASTERIZE, "page_errors", "2 of 2")),
     (ERROR, "page_errors", 0, 2, True, True, False)),
    ("no pages at all", DocFacts(1, error=StageError(Stage.RASTERIZE, "no_pages", "none")),
     (ERROR, "no_pages", 0, 0, True, True, False)),
    ("a copy of a failed input is not 'duplicate'", DocFacts(1, duplicate=True, error=BAD),
     (ERROR, "encrypted_pdf", 0, 0, True, True, False)),
    ("a copy of an input that failed for good", DocFacts(1, duplicate=True, original_failed=BAD),
     (ERROR, "encrypted_pdf", 0, 0, True, True, False)),
    ("a copy of an input to be retried (it follows its original)",
     DocFacts(1, duplicate=True, original_failed=NET), (ERROR, "unreadable", 0, 0, False, False, False)),
    ("no outcome reported: never lost", DocFacts(1, reported=False), (ERROR, "lost_document", 0, 0, False, False,
                                                                      False)),
    ("repaired file, a page blank: partial", DocFacts(1, pages_ok=3, damaged=True, pages_blank=1),
     (PARTIAL, "damaged_blank_pages", 3, 0, True, True, False)),
    ("repaired file, no page blank: ok", DocFacts(1, pages_ok=3, damaged=True), (OK, None, 3, 0, True, True, False)),
    ("a blank page of an intact file: ok", DocFacts(1, pages_ok=3, pages_blank=1), (OK, None, 3, 0, True, True,
                                                                                    False)),
]


def test_a_timeout_is_not_transient() -> None:
    """A CPU-bomb page times out on every try: the pool does not run it again in a fresh worker
    (a crash it does), and the row says how to ask for another try."""
    from pipeline.ledger import retry_in_fresh_worker

    assert not retry_in_fresh_worker(TIMEOUT, 1)
    assert retry_in_fresh_worker(CRASH, 1) and not retry_in_fresh_worker(CRASH, POLICY.worker_attempts)
    assert retry_in_fresh_worker(TIMEOUT, 1, RetryPolicy(timeout_attempts=2))
    verdict = decide(DocFacts(1, error=TIMEOUT))
    assert verdict.final and not verdict.error.retryable and "--retry-timeouts" in verdict.error.message


@pytest.mark.parametrize(("name", "facts", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_the_fate_of_a_document(name: str, facts: DocFacts, expected: tuple) -> None:
    verdict = decide(facts)
    got = (verdict.status, verdict.error.type if verdict.error else None, verdict.pages_ok, verdict.pages_failed,
           verdict.keep_pages, verdict.final, retry_in_run(facts))
    assert got == expected
    # the rules that hold for every row
    assert verdict.final == (verdict.error is None or not verdict.error.retryable)
    assert verdict.keep_pages or (verdict.pages_ok == verdict.pages_failed == 0)  # no pages counted, none kept
    assert verdict.final or verdict.status is DocStatus.ERROR  # a row to be redone is an error row
    if verdict.final and facts.attempt >= POLICY.runs and verdict.error is not None and any(
            e.retryable for e in (facts.error, *facts.page_errors) if e):
        assert "after 3 attempts" in verdict.error.message


def test_one_policy_holds_every_budget() -> None:
    from flows import tasks
    from pipeline import prepare, runner
    from pipeline.shard import run as shard_run

    assert prepare.MAX_ATTEMPTS == POLICY.worker_attempts
    assert tasks.SHARD_RETRIES == POLICY.shard_task_retries
    assert shard_run.DEVICE_FAILURE_BATCHES == POLICY.device_failure_batches
    for module in (runner, shard_run):
        assert not hasattr(module, "IN_RUN_ROUNDS") and not hasattr(module, "MAX_ATTEMPTS")
    assert prepare.MAX_DEATHS_IN_A_ROW == POLICY.worker_deaths_in_a_row
    assert prepare.MAX_STARTUP_DEATHS == POLICY.worker_startup_deaths
    assert tasks.discover_task.retries == POLICY.discover_task_retries
    from flows.fanout import FanOut, fanout

    assert inspect.signature(fanout.fn).parameters["max_resubmits"].default == POLICY.child_run_resubmits
    assert FanOut().max_resubmits == POLICY.child_run_resubmits
    # a policy with more runs keeps trying where the default gives up
    facts = DocFacts(3, error=NET)
    assert decide(facts).final and not decide(facts, RetryPolicy(runs=5)).final
    assert RetryPolicy(backoff_s=(1.0, 3.0)).backoff(5) == 3.0


def budget_literals(root: Path) -> list[str]:
    """Retry budgets written as numbers outside the ledger: a keyword argument or a parameter
    default named like a budget (`retries`, `max_resubmits`, `max_attempts`, `max_deaths*`, ...)
    given an int literal, or a module constant so named assigned one."""
    budget = ("retries", "resubmits", "attempts", "deaths")
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "pipeline/ledger.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            pairs: list[tuple[str, ast.AST]] = []
            if isinstance(node, ast.keyword) and node.arg:
                pairs.append((node.arg, node.value))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Parameter" and len(node.args) > 0:
                name = node.args[0].value if isinstance(node.args[0], ast.Constant) else ""
                pairs += [(str(name), k.value) for k in node.keywords if k.arg == "default"]
            elif isinstance(node, ast.Assign):
                pairs += [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.arguments):
                positional = node.posonlyargs + node.args
                pairs += [(a.arg, d) for a, d in zip(positional[len(positional) - len(node.defaults):], node.defaults)]
                pairs += [(a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
            for name, value in pairs:
                if (set(name.lower().split("_")) & set(budget) and isinstance(value, ast.Constant)
                        and type(value.value) is int):
                    found.append(f"{rel}:{value.lineno}: {name}={value.value}")
    return found


def test_every_retry_budget_is_the_ledgers(tmp_path: Path) -> None:
    """No retry budget is a number outside RetryPolicy (pipeline/ and flows/), and the cross-run
    rule `Dataset.read_state` applies is the ledger's (a policy with more runs retries more)."""
    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "src"
    for package in ("pipeline", "flows"):
        shutil.copytree(root / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert budget_literals(copy) == []
    # the scan is not blind
    (copy / "flows" / "extra.py").write_text("@task(retries=2)\ndef f(max_resubmits: int = 1): pass\n"
                                             "MAX_DEATHS_IN_A_ROW = 5\n")
    assert sorted(w.split(": ")[1] for w in budget_literals(copy)) == ["MAX_DEATHS_IN_A_ROW=5", "max_resubmits=1",
                                                                       "retries=2"]
    from pipeline.ledger import retry_in_later_run

    assert retry_in_later_run(True, 2, "unreadable") and not retry_in_later_run(True, POLICY.runs, "unreadable")
    assert retry_in_later_run(True, 3, "unreadable", policy=RetryPolicy(runs=5))
    assert retry_in_later_run(False, 1, "document_timeout", retry_timeouts=True)
    assert not retry_in_later_run(False, 1, "document_timeout")


# ---- the ledger is the only writer of a document's status ------------------------------

def status_writers(root: Path) -> list[str]:
    """Places under `root` (a copy of pipeline/) that set a document's status outside the
    ledger, read with `ast`: a `DocStatus` member or `DocStatus(...)` used other than in a
    comparison, a `Verdict(...)` built, a `status=` keyword given a DocStatus, or an
    assignment to an attribute `.status`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "ledger.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        compared = {id(node) for cmp in ast.walk(tree) if isinstance(cmp, ast.Compare)
                    for node in (cmp.left, *cmp.comparators)}
        for node in ast.walk(tree):
            what = None
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "DocStatus"
                    and id(node) not in compared):
                what = f"DocStatus.{node.attr}"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("DocStatus",
                                                                                                     "Verdict"):
                what = f"{node.func.id}(...)"
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                flat = [t for target in targets for t in ast.walk(target)]
                if any(isinstance(t, ast.Attribute) and t.attr == "status" for t in flat):
                    what = ".status = ..."
            elif isinstance(node, ast.keyword) and node.arg == "status" and "DocStatus" in ast.unparse(node.value):
                what = "status=DocStatus..."
            if what:
                found.append(f"{rel}:{getattr(node, 'lineno', '?')}: {what}")
    return found


def test_only_the_ledger_sets_a_documents_status(tmp_path: Path) -> None:
    pipeline = Path(__file__).resolve().parents[1] / "pipeline"
    assert status_writers(pipeline) == []
    # the scan is not blind: the ledger itself is a writer, and so is each planted violation
    copy = tmp_path / "pipeline"
    shutil.copytree(pipeline, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "ledger.py").rename(copy / "not_the_ledger.py")
    assert any(w.startswith("not_the_ledger.py:") and "Verdict(...)" in w for w in status_writers(copy))
    (copy / "not_the_ledger.py").unlink()
    planted = {
        "outcome.status = DocStatus.PARTIAL": [".status = ...", "DocStatus.PARTIAL"],
        "state.outcome.status = 'error'": [".status = ..."],
        "make(status=DocStatus('ok'))": ["DocStatus(...)", "status=DocStatus..."],
        "label = DocStatus.ERROR if failed else DocStatus.OK": ["DocStatus.ERROR", "DocStatus.OK"],
    }
    for line, expected in planted.items():
        (copy / "prepare" / "document.py").write_text((pipeline / "prepare" / "document.py").read_text() + line + "\n")
        got = [w.split(": ", 1)[1] for w in status_writers(copy)]
        assert sorted(got) == sorted(expected), line
    # reading a status is not writing one
    (copy / "prepare" / "document.py").write_text("ok = verdict.status is DocStatus.ERROR\n")
    assert status_writers(copy) == []
