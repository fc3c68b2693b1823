"""Fuzzing the three ways bad input enters: the config loader, the command line, and the
message decoders (client requests and server-side replies).

Every case must end in a result or an ``EloraFedError`` (a named ConfigError or DataError;
argparse's usage error for the command line), never another exception, and within the
hypothesis deadline, so never a hang. Each test counts its cases and checks they all ran.
"""

import contextlib
import json
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.protocol import number, run_config
from clients.records import ensemble_from, sketch_from_record, statistics_from_record
from elora_fed import cli
from elora_fed.config import RunConfig, parse_override
from elora_fed.errors import EloraFedError
from strategies.validation import UpdateLimits, rejection

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # to build Messages in-process
CASES: Counter[str] = Counter()
FUZZ = settings(
    max_examples=1000,
    deadline=10_000,
    derandomize=True,  # the same cases in every CI run; change the strategies to explore more
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEYS = sorted(RunConfig().to_flat())
scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=25))


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_config_loader_accepts_or_names_the_problem(flat):
    CASES["config"] += 1
    with contextlib.suppress(EloraFedError):
        RunConfig.from_flat(flat)


@FUZZ
@given(st.text(max_size=60))
def test_override_parser_accepts_or_names_the_problem(text):
    CASES["override"] += 1
    with contextlib.suppress(EloraFedError):
        parse_override(text)


override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=15)),
    st.builds(lambda k, v: f"{k}={json.dumps(v)}", st.sampled_from(KEYS), scalars),
    st.text(max_size=25),
)
COMMANDS = {"fetch-data", "convert-model", "data-stats", "sketch", "affinity", "run", "check"}
argv = st.one_of(
    st.lists(st.text(max_size=15), max_size=5).filter(lambda a: not a or a[0] not in COMMANDS),  # no valid command
    st.builds(lambda sets: ["affinity", "/nonexistent/sketches", *[f"--set={s}" for s in sets]], st.lists(override)),
    st.builds(lambda p: ["run", "--resume", f"/nonexistent/{p}"], st.text(max_size=10)),
    st.builds(
        lambda p, sets: ["run", "--preset", p, *[f"--set={s}" for s in sets]],
        st.text(max_size=8),
        st.lists(override, min_size=1),
    ),
)


@settings(FUZZ, max_examples=300)
@given(args=argv)
def test_command_line_exits_2_with_one_line(args, tmp_path, capsys):
    """No fuzzed command line may start work: every one has a bad key, value or path."""
    CASES["cli"] += 1
    args = [*args, f"--set=run_dir={tmp_path}"] if args[:1] in (["affinity"],) else args
    if args[:1] == ["run"] and "--resume" not in args:
        args = [*args, "--set=model.name=", "--set=data.num_clients=-1"]  # invalid, so nothing runs
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's usage error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip()


names = st.sampled_from(
    [
        "run",
        "config",
        "options",
        "sketch",
        "sketch_meta",
        "statistics",
        "arrays",
        "metrics",
        "group.0.base",
        "group.1.boost.0",
        "group.x.base",
    ]
)
dtypes = st.sampled_from(["float32", "float64", "int32", "uint8", "bool"])
arrays = st.one_of(
    st.builds(
        lambda shape, dtype, seed: np.random.default_rng(seed).normal(size=shape).astype(dtype),
        st.lists(st.integers(0, 4), max_size=3).map(tuple),
        dtypes,
        st.integers(0, 2**16),
    ),
    st.builds(
        lambda dtype, shape, data: Array(dtype, shape, "numpy.ndarray", data),
        st.text(max_size=8) | dtypes,
        st.lists(st.integers(0, 5), max_size=3).map(tuple),
        st.binary(max_size=64),
    ),
)
config_values = st.one_of(
    st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=20), st.booleans(), st.binary(max_size=8)
)


@st.composite
def records(draw) -> RecordDict:
    content = RecordDict()
    for name in draw(st.lists(names, max_size=5, unique=True)):
        kind = draw(st.sampled_from(["array", "config", "metric"]))
        if kind == "array":
            items = draw(
                st.dictionaries(
                    st.sampled_from(
                        [
                            "split",
                            "sample_index",
                            "outputs",
                            "features",
                            "labels",
                            "train.count",
                            "train.grad",
                            "a.weight",
                            "adapter",
                        ]
                    ),
                    arrays,
                    max_size=4,
                )
            )
            content[name] = ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in items.items()})
        elif kind == "config":
            keys_ = st.sampled_from(["config", "client_id", "metadata", "split", "weights", "x"])
            value = st.one_of(config_values, st.just(json.dumps({"model.name": "tiny-random"})), st.just("{}"))
            content[name] = ConfigRecord(draw(st.dictionaries(keys_, value, max_size=3)))
        else:
            nums = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True))
            content[name] = MetricRecord(
                draw(st.dictionaries(st.sampled_from(["num-examples", "loss", "x"]), nums, max_size=3))
            )
    return content


SENT = {"a.weight": torch.zeros(2, 3)}
LIMITS = UpdateLimits(max_update_norm=1.0, max_payload_bytes=4096)


@FUZZ
@given(records())
def test_message_decoders_decode_or_name_the_problem(content):
    CASES["messages"] += 1
    decoders = (
        run_config,
        lambda c: ensemble_from(c, SENT),
        sketch_from_record,
        lambda c: statistics_from_record(c, 4),
        lambda c: [number(r, "num-examples") for r in c.metric_records.values()],
    )
    for decode in decoders:
        with contextlib.suppress(EloraFedError):
            decode(content)
    kind = rejection(Message(content, dst_node_id=1, message_type="train"), SENT, LIMITS)
    assert kind is None or isinstance(kind, str)


TARGET_OF = {
    "test_config_loader_accepts_or_names_the_problem": "config",
    "test_override_parser_accepts_or_names_the_problem": "override",
    "test_command_line_exits_2_with_one_line": "cli",
    "test_message_decoders_decode_or_name_the_problem": "messages",
}


@pytest.fixture(scope="module", autouse=True)
def every_case_ran(request):
    """Every fuzz target this session selected ran at least 50 examples (a target that never ran fails)."""
    yield
    selected = {TARGET_OF[item.name] for item in request.session.items if item.name in TARGET_OF}
    ran = dict(CASES)
    print(f"\nfuzz cases run: {ran}, total {sum(ran.values())}")
    short = {k: ran.get(k, 0) for k in selected if ran.get(k, 0) < 50}
    assert not short, f"fuzz targets with fewer than 50 examples: {short}"
