"""The CUDA backend's driver-call protocol, on a recording stand-in for ``pycuda.driver``
(tests/fake_pycuda.py): which calls it makes, on which streams and contexts, in which order.

These are protocol tests.  The stand-in runs each launch with the op's reference
implementation, so training through it must reproduce the reference backend, but that proves
the ordering of copies, events and launches (a missing wait gives other numbers under the
stand-in's lazy or shuffled execution), never that the CUDA kernels compute the right numbers:
only tests/test_cuda_backend.py on a GPU shows that.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnc.backends import make_backend
from cnnc.backends.base import BackendError
from cnnc.backends.cuda import CudaBackend, pick_cubin
from cnnc.backends.reference import ReferenceBackend
from cnnc.build import compile_network
from cnnc.executor import Executor
from cnnc.plan.schedule import Buffer, Kernel

from fake_pycuda import FakeDriver, Pointer, ProtocolError, install

NET = """
network par
input data: 3x8x8
input labels: label(4)
train {{ batch = 8; lr = 0.05; momentum = 0.9; weight_decay = 0.001; seed = 5; init_w = 0.1 }}
{conv1}conv1 = conv(data, filters=6, size=3, padding=1) relu
{pool1}pool1 = maxpool(conv1, size=2, stride=2)
{fc2}fc2 = fc(pool1, outputs=10) tanh
{fc3}fc3 = fc(fc2, outputs=4)
{probs}probs = softmax(fc3)
cost = logreg(labels, probs)
"""

PLACEMENTS = {
    "single": {},
    "data-2": {"conv1": "@gpu(0,1)"},
    "model-3": {"conv1": "@gpu(0)", "pool1": "@gpu(1)", "fc2": "@gpu(0)", "fc3": "@gpu(2)", "probs": "@gpu(1)"},
}


def source(placement: dict) -> str:
    fields = {k: "" for k in ("conv1", "pool1", "fc2", "fc3", "probs")}
    fields.update({k: v + " " for k, v in placement.items()})
    return NET.format(**fields)


def batches(steps: int):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 4, 8).astype(np.int32))
            for _ in range(steps)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """One build per placement, with (empty) sm_80 cubins for the stand-in to 'load'."""
    root = tmp_path_factory.mktemp("cuda-protocol")
    out = {}
    for name, placement in PLACEMENTS.items():
        plan = compile_network(source(placement), "par.cnn", root / name, use_nvcc=False).plan
        for dev in plan.devices:
            (root / name / f"gpu{dev}.sm_80.cubin").write_bytes(b"")
        out[name] = (plan, root / name)
    return out


def reference_kernels(fake: FakeDriver, ex: Executor) -> None:
    """Let the stand-in run each launch with the reference implementation of its op, on typed
    views of its device memory (found from the launch's kernel and pointers)."""
    plan, runner = ex.plan, ReferenceBackend()
    ops = {}
    for program in plan.programs.values():
        for dev_ops in program.values():
            for op in dev_ops:
                if op.kind == "launch":
                    ops.setdefault((op.kernel, tuple(int(ex.handles[b]) for b in op.args)), op)

    def run(name, args):
        op = ops[(name, tuple(int(a) for a in args if isinstance(a, Pointer)))]
        buffers = iter(op.args)
        views = []
        for a in args:
            if isinstance(a, Pointer):
                b = plan.buffers[next(buffers)]
                views.append(fake.view(a, np.int32 if b.dtype == "i32" else np.float32, b.size))
            else:
                views.append(a)
        runner.launch(plan.kernels[name], 0, views)
    fake.run_kernel = run


def cuda_executor(monkeypatch, build, gpus, **fake_options) -> tuple[Executor, FakeDriver]:
    plan, build_dir = build
    fake = install(monkeypatch, FakeDriver(**fake_options))
    ex = Executor(plan, make_backend("cuda", plan, build_dir, gpus))
    reference_kernels(fake, ex)
    return ex, fake


def train(ex: Executor, steps: int) -> list:
    return [ex.train_step(x, y, i / steps)[0] for i, (x, y) in enumerate(batches(steps))]


def reference_run(build, steps: int):
    plan, _ = build
    ex = Executor(plan, ReferenceBackend())
    return train(ex, steps), ex.parameters()


def assert_same_training(ex: Executor, build, steps: int = 3) -> None:
    losses = train(ex, steps)
    want_losses, want = reference_run(build, steps)
    np.testing.assert_allclose(np.array(losses), np.array(want_losses), rtol=1e-6, atol=1e-7)
    got = ex.parameters()
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


# -- module choice -------------------------------------------------------------------------

@pytest.mark.parametrize("available, cc, chosen", [
    (["sm_80", "sm_90"], (8, 0), "sm_80"),
    (["sm_80", "sm_90"], (8, 6), "sm_80"),          # a cubin runs on later minors of its major
    (["sm_80", "sm_86", "sm_90"], (8, 9), "sm_86"),
    (["sm_80", "sm_90"], (9, 0), "sm_90"),
    (["sm_80", "sm_90"], (12, 0), None),            # no cubin runs on another major
    (["sm_80", "sm_90"], (7, 5), None),             # nor on an earlier minor
    (["sm_86"], (8, 0), None),
    (["sm_90", "sm_90a"], (9, 0), "sm_90a"),
    (["sm_90a"], (9, 1), None),                     # arch-specific: its own capability only
    (["sm_100", "sm_100f", "sm_120"], (10, 3), "sm_100f"),
    (["sm_120"], (12, 1), "sm_120"),
])
def test_pick_cubin(available, cc, chosen):
    assert pick_cubin(available, cc) == chosen


def loaded(fake: FakeDriver) -> list[str]:
    return [Path(c.detail["path"]).name for c in fake.calls("module_from_file")]


def test_an_sm86_card_loads_the_sm80_cubin(monkeypatch, builds):
    plan, build_dir = builds["single"]
    (build_dir / "gpu0.ptx").write_text("// ptx")
    try:
        fake = install(monkeypatch, FakeDriver(capabilities=[(8, 6)]))
        backend = CudaBackend(build_dir, {0: 0})
    finally:
        (build_dir / "gpu0.ptx").unlink()
    assert loaded(fake) == ["gpu0.sm_80.cubin"]
    assert "sm_80 cubin" in backend.describe()


def test_a_card_without_a_fitting_cubin_jits_the_ptx(monkeypatch, builds):
    plan, build_dir = builds["single"]
    (build_dir / "gpu0.ptx").write_text("// ptx")
    try:
        fake = install(monkeypatch, FakeDriver(capabilities=[(12, 0)]))
        backend = CudaBackend(build_dir, {0: 0})
        assert loaded(fake) == ["gpu0.ptx"]
        assert "PTX" in backend.describe()
        install(monkeypatch, FakeDriver(capabilities=[(12, 0)], ptx_error="a PTX JIT compilation failed"))
        with pytest.raises(BackendError, match="update the driver, or recompile with --arch sm_120"):
            CudaBackend(build_dir, {0: 0})
    finally:
        (build_dir / "gpu0.ptx").unlink()


def test_no_cubin_no_ptx_no_nvcc_is_a_clear_error(monkeypatch, builds):
    _, build_dir = builds["single"]
    install(monkeypatch, FakeDriver(capabilities=[(12, 0)]))
    monkeypatch.setattr("cnnc.codegen.nvcc.find_nvcc", lambda: None)
    with pytest.raises(BackendError, match=r"no cubin for .*sm_120.*cubins: sm_80.*no PTX"):
        CudaBackend(build_dir, {0: 0})


# -- training through the stand-in -----------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 1, 2])
def test_single_gpu_training_matches_reference(monkeypatch, builds, seed):
    ex, fake = cuda_executor(monkeypatch, builds["single"], [0], seed=seed)
    assert_same_training(ex, builds["single"])


@pytest.mark.parametrize("seed", [None, 3])
def test_data_parallel_with_peer_access_copies_device_to_device(monkeypatch, builds, seed):
    ex, fake = cuda_executor(monkeypatch, builds["data-2"], [0, 1], capabilities=[(8, 0)] * 2,
                             peers={(0, 1), (1, 0)}, seed=seed)
    assert ex.backend.peer == {(0, 1), (1, 0)}
    assert_same_training(ex, builds["data-2"])
    between = [c for c in fake.calls("dtod") if fake.device_of(c.detail["src"]) != c.device]
    assert between, "the gradient exchange never copied between the GPUs"
    for c in between:                            # issued in the destination's context, which reads the source
        assert (c.device, fake.device_of(c.detail["src"])) in fake.enabled


@pytest.mark.parametrize("seed", [None, 4, 5])
def test_data_parallel_without_peer_access_stages_through_pinned_memory(monkeypatch, builds, seed):
    ex, fake = cuda_executor(monkeypatch, builds["data-2"], [0, 1], capabilities=[(8, 0)] * 2, seed=seed)
    assert ex.backend.peer == set()
    assert_same_training(ex, builds["data-2"])
    assert fake.calls("dtoh") and not [c for c in fake.calls("dtod")
                                       if fake.device_of(c.detail["src"]) != c.device]
    portable = [c for c in fake.calls("pagelocked_empty") if c.detail["flags"] & fake.host_alloc_flags.PORTABLE]
    assert portable, "staging memory two contexts use must be PORTABLE"


@pytest.mark.parametrize("seed", [None, 6, 7, 8])
def test_model_parallel_on_three_gpus(monkeypatch, builds, seed):
    ex, fake = cuda_executor(monkeypatch, builds["model-3"], [0, 1, 2], capabilities=[(8, 0)] * 3,
                             peers={(1, 0), (0, 1)}, seed=seed)
    assert_same_training(ex, builds["model-3"])


def test_logical_devices_sharing_a_gpu(monkeypatch, builds):
    ex, fake = cuda_executor(monkeypatch, builds["data-2"], [0, 0], seed=9)
    assert_same_training(ex, builds["data-2"])
    assert len(fake.calls("retain_primary_context")) == 1


@pytest.mark.parametrize("seed", [10, 11, 12, 13])
def test_runs_do_not_overtake_the_previous_run(monkeypatch, builds, seed):
    """Model parallel: only GPU 1 holds the cost, so reading the loss leaves GPU 0's backward
    pass (which reads the input images) queued; the next step's upload of new images must
    wait for it.  Without the fence between runs the shuffled stand-in overwrites them early."""
    ex, fake = cuda_executor(monkeypatch, builds["model-3"], [0, 1, 2], capabilities=[(8, 0)] * 3, seed=seed)
    want, _ = reference_run(builds["model-3"], 4)
    np.testing.assert_allclose(np.array(train(ex, 4)), np.array(want), rtol=1e-6, atol=1e-7)


def test_without_the_fence_between_runs_some_schedule_goes_wrong(monkeypatch, builds):
    """The fence test above can fail: without the fence, some shuffled schedule differs."""
    want, _ = reference_run(builds["model-3"], 4)
    wrong = 0
    for seed in range(10, 20):
        ex, _ = cuda_executor(monkeypatch, builds["model-3"], [0, 1, 2], capabilities=[(8, 0)] * 3, seed=seed)
        monkeypatch.setattr(ex.backend, "begin_run", lambda: None)
        losses = np.array(train(ex, 4))
        wrong += not np.allclose(losses, np.array(want), rtol=1e-6, atol=1e-7)
    assert wrong


# -- what a step may and may not do ------------------------------------------------------------

def step_calls(monkeypatch, build, gpus, **options):
    """The driver calls of the third training step (after two that allocate and prepare)."""
    ex, fake = cuda_executor(monkeypatch, build, gpus, **options)
    (x, y), = batches(1)
    for i in range(2):
        ex.train_step(x, y, 0.1 * i)
        ex.parameters_flagged()
    start = len(fake.log)
    ex.train_step(x, y, 0.2)
    ex.parameters_flagged()
    return ex, fake, fake.log[start:]


@pytest.mark.parametrize("placement, gpus, peers", [("single", [0], ()), ("data-2", [0, 1], ()),
                                                     ("data-2", [0, 1], {(0, 1), (1, 0)})])
def test_a_step_never_waits_for_a_whole_device(monkeypatch, builds, placement, gpus, peers):
    ex, fake, calls = step_calls(monkeypatch, builds[placement], gpus, capabilities=[(8, 0)] * len(gpus),
                                 peers=peers)
    names = {c.name for c in calls}
    assert not names & {"Context.synchronize", "Stream.synchronize"}
    assert not names & {"mem_alloc", "pagelocked_empty", "Event", "prepare", "module_from_file"}
    # the host waits only on the event after a copy to the host or after a staging buffer's last copy
    b = ex.backend
    slots = {id(slot.done) for ring in [*b._uploads.values(), *b._bounce.values()] for slot in ring[1:] if slot}
    staging = {id(s.released) for ring in b._staging.values() for s in ring[1:] if s}
    waited = [c.detail["event"] for c in calls if c.name == "Event.synchronize"]
    assert waited and all(id(e) in slots | staging for e in waited)
    assert len(waited) <= len([c for c in calls if c.name == "dtoh"]) + 2 * len(b._uploads)


def test_minibatch_uploads_go_on_the_copy_in_stream_from_pinned_memory(monkeypatch, builds):
    ex, fake, calls = step_calls(monkeypatch, builds["data-2"], [0, 1], capabilities=[(8, 0)] * 2)
    uploads = {int(ex.handles[op.dst]): d for d, ops in ex.plan.programs["train"].items()
               for op in ops if op.kind == "upload"}
    seen = [c for c in calls if c.name == "htod" and c.detail["dest"] in uploads]
    assert len(seen) == len(uploads)
    for c in seen:
        assert c.stream is ex.backend.lanes[(uploads[c.detail["dest"]], "copy-in")].stream
        assert fake.is_pinned(c.detail["host"])


def test_events_have_no_timing_and_contexts_are_primary(monkeypatch, builds):
    ex, fake = cuda_executor(monkeypatch, builds["data-2"], [0, 1], capabilities=[(8, 0)] * 2)
    train(ex, 2)
    events = fake.calls("Event")
    assert events and all(c.detail["flags"] == fake.event_flags.DISABLE_TIMING for c in events)
    assert len(fake.calls("retain_primary_context")) == 2


def test_kernels_are_prepared_once_and_launched_with_a_packed_struct(monkeypatch, builds):
    ex, fake = cuda_executor(monkeypatch, builds["single"], [0])
    train(ex, 1)
    prepared = len(fake.calls("prepare"))
    launches = len(fake.calls("launch"))
    train(ex, 2)
    assert prepared and len(fake.calls("prepare")) == prepared
    assert len(fake.calls("launch")) == 3 * launches
    assert {c.detail["how"] for c in fake.calls("launch")} == {"_launch_kernel"}


def test_without_launch_kernel_the_prepared_call_is_used(monkeypatch, builds):
    ex, fake = cuda_executor(monkeypatch, builds["single"], [0], packed_launches=False, seed=16)
    assert_same_training(ex, builds["single"], steps=2)
    assert {c.detail["how"] for c in fake.calls("launch")} == {"prepared_async_call"}


def test_argument_kinds_follow_the_values_passed(monkeypatch, builds):
    _, build_dir = builds["single"]
    fake = install(monkeypatch, FakeDriver())
    backend = CudaBackend(build_dir, {0: 0})
    ptr = backend.alloc(Buffer("b", 0, 4, "f32", "activation", "l"), 0)
    kernel = Kernel("k", "relu", {}, "l", 1, "", {"cuda": {"grid": [1, 1, 1], "block": [32, 1, 1]}})
    seen = []
    fake.run_kernel = lambda name, args: seen.append(args)
    backend.launch(kernel, 0, [ptr, 0.5, np.int32(3), np.float32(2.0)])
    backend.launch(kernel, 0, [ptr, 0.25, np.int32(3), np.float32(2.0)])     # a new value, same kinds
    backend.launch(kernel, 0, [ptr, ptr])                     # scalars moved into a device buffer
    assert [c.detail["format"] for c in fake.calls("prepare")] == ["Pfif", "PP"]
    with pytest.raises(BackendError, match="cannot pass a str"):
        backend.launch(kernel, 0, [ptr, "x"])
    fake.drain()
    assert seen == [[ptr, 0.5, 3, 2.0], [ptr, 0.25, 3, 2.0], [ptr, ptr]]
    assert all(isinstance(a[0], Pointer) for a in seen) and not isinstance(seen[0][2], Pointer)


# -- staging buffers ---------------------------------------------------------------------------

def test_minibatch_staging_is_double_buffered(monkeypatch, builds):
    _, build_dir = builds["single"]
    fake = install(monkeypatch, FakeDriver())                  # lazy: nothing runs until waited for
    backend = CudaBackend(build_dir, {0: 0})
    buf = Buffer("x", 0, 16, "f32", "input", "data")
    ptr = backend.alloc(buf, 0)
    batches_ = [np.full(16, k, np.float32) for k in range(3)]
    hosts = []
    for k, batch in enumerate(batches_):
        before = len(fake.log)
        backend.upload(ptr, batch, "copy-in")
        calls = fake.log[before:]
        hosts.append(next(c.detail["host"] for c in calls if c.name == "htod"))
        waited = [c for c in calls if c.name == "Event.synchronize"]
        assert len(waited) == (k == 2), f"upload {k} waited {len(waited)} times"
    assert hosts[0] is not hosts[1]
    assert hosts[2].__array_interface__["data"][0] == hosts[0].__array_interface__["data"][0]
    np.testing.assert_array_equal(backend.download(ptr, buf), batches_[2])


def test_refilling_a_staging_slot_without_its_event_is_caught(monkeypatch, builds):
    """The stand-in catches a backend that forgets to wait before refilling a slot."""
    _, build_dir = builds["single"]
    fake = install(monkeypatch, FakeDriver())
    backend = CudaBackend(build_dir, {0: 0})
    ptr = backend.alloc(Buffer("x", 0, 16, "f32", "input", "data"), 0)
    monkeypatch.setattr(CudaBackend, "_ready", staticmethod(lambda slot: None))
    for k in range(3):
        backend.upload(ptr, np.full(16, k, np.float32), "copy-in")
    with pytest.raises(ProtocolError, match="refilled before the copy"):
        fake.drain()


def test_large_transfers_go_through_the_bounce_buffers_in_pieces(monkeypatch, builds):
    _, build_dir = builds["single"]
    fake = install(monkeypatch, FakeDriver(seed=14))
    backend = CudaBackend(build_dir, {0: 0})
    monkeypatch.setattr(backend, "BOUNCE_BYTES", 64)
    buf = Buffer("w", 0, 100, "f32", "param", "fc")
    ptr = backend.alloc(buf, 0)
    values = np.arange(100, dtype=np.float32)
    backend.upload(ptr, values)
    assert len(fake.calls("htod")) == 7 and len(fake.calls("pagelocked_empty")) == 2
    np.testing.assert_array_equal(backend.download(ptr, buf), values)
    assert not fake.calls("Context.synchronize", "Stream.synchronize")


def test_a_wait_for_an_unrecorded_event_is_refused(monkeypatch, builds):
    _, build_dir = builds["single"]
    install(monkeypatch, FakeDriver())
    backend = CudaBackend(build_dir, {0: 0})
    with pytest.raises(BackendError, match="never recorded"):
        backend.wait("e1", 0, "compute")
    with backend._on(0):
        with pytest.raises(ProtocolError, match="never recorded"):
            backend.lanes[(0, "compute")].stream.wait_for_event(backend._event())


def test_peer_access_another_library_enabled_counts(monkeypatch, builds):
    _, build_dir = builds["data-2"]
    fake = FakeDriver(capabilities=[(8, 0)] * 2, peers={(0, 1), (1, 0)})
    fake.enabled.add((1, 0))                     # e.g. PyTorch, in the same primary context
    install(monkeypatch, fake)
    assert CudaBackend(build_dir, {0: 0, 1: 1}).peer == {(0, 1), (1, 0)}


def test_peer_copies_need_access_enabled(monkeypatch, builds):
    """The stand-in refuses a device-to-device copy between GPUs without peer access."""
    _, build_dir = builds["data-2"]
    install(monkeypatch, FakeDriver(capabilities=[(8, 0)] * 2))
    backend = CudaBackend(build_dir, {0: 0, 1: 1})
    a = backend.alloc(Buffer("a", 0, 4, "f32", "activation", "l"), 0)
    b = backend.alloc(Buffer("b", 1, 4, "f32", "activation", "l"), 1)
    backend.peer.add((1, 0))                     # a backend that believes in access never enabled
    with pytest.raises(ProtocolError, match="without peer access"):
        backend.copy(a, 0, 0, b, 1, 0, 4)


def test_staging_buffers_are_reused_only_after_their_copy_out(monkeypatch, builds):
    """Three staged copies between two GPUs, the third on another stream of the destination
    than the first, which used the same staging buffer: the source may refill the buffer only
    after the destination has copied the first one out of it."""
    _, build_dir = builds["data-2"]
    install(monkeypatch, FakeDriver(capabilities=[(8, 0)] * 2))
    backend = CudaBackend(build_dir, {0: 0, 1: 1})
    src = [Buffer(f"s{k}", 0, 4, "f32", "activation", "l") for k in range(3)]
    dst = [Buffer(f"d{k}", 1, 4, "f32", "activation", "l") for k in range(3)]
    src_ptr = [backend.alloc(b, 0) for b in src]
    dst_ptr = [backend.alloc(b, 1) for b in dst]
    for k, p in enumerate(src_ptr):
        backend.upload(p, np.full(4, k + 1, np.float32))
    backend.record("ready", 0)
    for k, stream in enumerate(["copy-in", "compute", "compute"]):
        backend.wait("ready", 1, stream)
        backend.copy(src_ptr[k], 0, 0, dst_ptr[k], 1, 0, 4, stream)
    for k, (p, b) in enumerate(zip(dst_ptr, dst)):
        np.testing.assert_array_equal(backend.download(p, b), np.full(4, k + 1, np.float32))


def test_the_digits_example_trains_as_on_the_reference_backend(monkeypatch, tmp_path):
    source = (Path(__file__).parent.parent / "examples" / "digits.cnn").read_text()
    plan = compile_network(source, "digits.cnn", tmp_path, use_nvcc=False).plan
    (tmp_path / "gpu0.sm_80.cubin").write_bytes(b"")
    ex, _ = cuda_executor(monkeypatch, (plan, tmp_path), [0], seed=15)
    reference = Executor(plan, ReferenceBackend())
    rng = np.random.default_rng(1)
    for step in range(2):
        x = rng.standard_normal((plan.batch, 1, 8, 8)).astype(np.float32)
        y = rng.integers(0, 10, plan.batch).astype(np.int32)
        np.testing.assert_allclose(ex.train_step(x, y, step / 2)[0], reference.train_step(x, y, step / 2)[0],
                                   rtol=1e-6, atol=1e-7)
    want = reference.parameters()
    for k, v in ex.parameters().items():
        np.testing.assert_allclose(v, want[k], rtol=1e-5, atol=1e-7, err_msg=k)
