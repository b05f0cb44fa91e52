"""featx.memory: sizes, budgets, estimates, the path a plan picks, and estimates against measured peaks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from featx import memory
from featx.errors import FeatxError, UsageError
from featx.memory import NotEnoughMemory, Plan, budget, estimate, parse_size, plan_fit


@pytest.mark.parametrize("text, value", [("24G", 24 << 30), ("512M", 512 << 20), ("1.5G", 3 << 29), ("100", 100),
                                         ("64k", 64 << 10), ("2GiB", 2 << 30), (" 8 gb ", 8 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "12X", "0", "lots"])
def test_parse_size_refuses_with_one_line(text):
    with pytest.raises(UsageError) as e:
        parse_size(text)
    assert "\n" not in str(e.value) and "--max-memory" in str(e.value)


def test_budget_default_is_a_share_of_available():
    avail = memory.available()
    assert avail > 0
    assert abs(budget() - 0.7 * memory.available()) <= 0.05 * avail + (64 << 20)
    assert budget("1G") == 1 << 30 and budget(12345) == 12345
    with pytest.raises(UsageError):
        budget(0)


def test_every_head_and_path_estimates_and_grows_with_the_rows():
    for head, paths in memory.PATHS.items():
        for path in paths:
            small = estimate(head, path, 1000, 512, 10)
            big = estimate(head, path, 8000, 512, 10)
            assert 0 < small <= big, (head, path)
    with pytest.raises(UsageError):
        estimate("svm", "memory", 10, 10, 2)
    with pytest.raises(UsageError):
        estimate("knn", "memory", 10, 10, 2)


def test_stream_does_not_grow_with_the_rows_but_for_the_scores():
    a = estimate("logreg", "stream", 10_000, 4096, 2)
    b = estimate("logreg", "stream", 1_000_000, 4096, 2)
    assert b - a <= (1_000_000 - 10_000) * 2 * 2 * 8 + 1  # only the kept scores grow


def test_data_in_memory_counts_the_float32_rows_once():
    with_data = estimate("svm", "gram", 3000, 9216, 20)
    without = estimate("svm", "gram", 3000, 9216, 20, data_in_memory=False)
    assert with_data - without == 3000 * 9216 * 4


def test_plan_picks_gram_for_few_rows_feature_for_many_then_stream():
    ample = 1 << 40
    assert plan_fit("svm", 2000, 9216, 20, budget=ample).path == "gram"
    assert plan_fit("svm", 60_000, 4096, 20, budget=ample).path == "feature"
    p = plan_fit("svm", 60_000, 4096, 200, budget=ample)
    assert isinstance(p, Plan) and p.peak == p.estimates["feature"] and p.budget == ample
    assert set(p.estimates) == {"gram", "feature", "stream"}
    stream_need = p.estimates["stream"]
    tight = plan_fit("svm", 60_000, 4096, 200, budget=stream_need)
    assert tight.path == "stream"
    assert plan_fit("logreg", 200_000, 2048, 10, budget=ample).path == "memory"
    lr = plan_fit("logreg", 200_000, 2048, 10, budget=ample)
    assert plan_fit("logreg", 200_000, 2048, 10, budget=lr.estimates["stream"]).path == "stream"


def test_plan_refuses_in_one_line_naming_the_need_and_the_budget():
    with pytest.raises(NotEnoughMemory) as e:
        plan_fit("svm", 100_000, 25_088, 200, budget=1 << 20)
    msg = str(e.value)
    assert "\n" not in msg and "--max-memory" in msg and "budget 1 MB" in msg and msg.startswith("needs ")
    assert isinstance(e.value, FeatxError)
    with pytest.raises(NotEnoughMemory, match="svm gram path"):
        plan_fit("svm", 40_000, 512, 10, budget=2 << 30, path="gram")
    assert plan_fit("svm", 40_000, 512, 10, budget=1 << 40, path="gram").path == "gram"


def test_limits_are_monotone_in_the_budget():
    e = [estimate("svm", "gram", n, 9216, 200) for n in (1000, 2000, 4000, 8000)]
    assert e == sorted(e)


_FIT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    head, path, n, d, k = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    C = sys.argv[7] if sys.argv[7] in ("auto", "-") else float(sys.argv[7])
    from featx import heads
    from featx.metrics import predict_and_score
    if head == "mlp":
        import torch  # noqa: F401  (its import belongs to the baseline)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if sys.argv[6] == "baseline":
        print(json.dumps({"base": base})); sys.exit()
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, size=n)
    X = (rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))).astype(np.float32)
    held = 0
    if path == "stream":  # chunks copied out of X as a feature set's are read; X itself is not the fit's
        held = X.nbytes
        def batches():
            for a in range(0, n, 4096):
                yield np.array(X[a:a + 4096], copy=True), y[a:a + 4096]
        cls = {"svm": heads.SVMHead, "logreg": heads.LogisticHead, "mlp": heads.MLPHead}[head]
        kw = {"epochs": 2, "batch_size": 256} if head == "mlp" else {"max_iter": 30, "C": C}
        est = cls(**kw).fit_stream(batches, classes=np.arange(k), n_features=d)
    elif head == "svm":
        est = heads.SVMHead(C=C, max_iter=30)
        est.fit(X, y, problem=heads.LinearProblem(X, space=path))
    elif head == "logreg":
        est = heads.LogisticHead(C=1.0, max_iter=30).fit(X, y)
    else:
        est = heads.MLPHead(hidden=256, epochs=2, batch_size=256).fit(X, y)
    for a in range(0, n, 4096):
        predict_and_score(est, X[a:a + 4096])
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - held}))
""")


def _run(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _FIT, *args], capture_output=True, text=True, env=env, timeout=600,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("head, path, n, d, k, C", [
    ("svm", "gram", 1600, 2048, 20, "0.1"),
    ("svm", "gram", 1600, 2048, 20, "auto"),
    ("svm", "feature", 4000, 512, 20, "0.1"),
    ("svm", "feature", 4000, 512, 20, "auto"),
    ("logreg", "memory", 4000, 1024, 20, "1.0"),
    ("mlp", "memory", 4000, 1024, 20, "-"),
    ("svm", "stream", 12000, 512, 20, "auto"),
    ("logreg", "stream", 12000, 512, 20, "1.0"),
    ("mlp", "stream", 12000, 512, 20, "-"),
])
def test_measured_peak_is_within_the_estimate(head, path, n, d, k, C):
    """A real fit in a fresh process: its peak RSS, less the same process's peak just after its imports, stays
    within the estimate (which leaves the interpreter and the libraries' code out).  The SVM with a given C and
    with C="auto", which also fits a copy of the rows it does not hold out."""
    base = _run(head, path, str(n), str(d), str(k), "baseline", C)["base"]
    peak = _run(head, path, str(n), str(d), str(k), "fit", C)["peak"]
    predicted = estimate(head, path, n, d, k, choose_c=C == "auto")
    assert peak - base <= predicted, (peak - base, predicted)
