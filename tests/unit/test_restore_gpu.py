"""Restore onto CUDA: pinned buffers, side-stream copies, budgets, resharding, read-once."""

from __future__ import annotations

import pytest
import torch

import dckpt
from dckpt_testing import run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cpu_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(512, 1024, generator=g),
            "h": torch.randn(333, 77, generator=g).half(),
            "b": torch.randn(4096, generator=g).bfloat16(),
            "i": torch.randint(0, 1 << 30, (1000,), generator=g),
            "step": 7}


def _cuda_zeros(like: dict) -> dict:
    return {k: torch.zeros(v.shape, dtype=v.dtype, device="cuda")
            if isinstance(v, torch.Tensor) else 0 for k, v in like.items()}


def _assert_loaded(got: dict, want: dict) -> None:
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].device.type == "cuda", k
            # compared on the default stream, without an explicit synchronize: load's
            # copies must be complete when it returns
            assert torch.equal(got[k], v.to("cuda")), k
        else:
            assert got[k] == v, k


@pytest.mark.parametrize("budget", [1 << 30, 4096])
def test_load_into_cuda_tensors(tmp_path, budget):
    want = _cpu_state()
    dckpt.save(want, str(tmp_path), step=1)
    got = _cuda_zeros(want)
    info = dckpt.load(got, str(tmp_path), config=dckpt.LoadConfig(read_buffer_bytes=budget))
    assert info.step == 1
    _assert_loaded(got, want)


def test_load_into_non_contiguous_cuda_tensors(tmp_path):
    want = {"t": torch.randn(64, 48).t().contiguous(), "x": torch.arange(12.0).reshape(3, 4)}
    dckpt.save(want, str(tmp_path), step=1)
    got = {"t": torch.zeros(64, 48, device="cuda").t(),  # a transposed view
           "x": torch.zeros(3, 8, device="cuda")[:, ::2]}  # every second column
    dckpt.load(got, str(tmp_path))
    assert not got["t"].is_contiguous() and not got["x"].is_contiguous()
    assert torch.equal(got["t"].cpu(), want["t"])
    assert torch.equal(got["x"].cpu(), want["x"])


def test_cuda_state_saved_then_restored_onto_cuda(tmp_path):
    g = torch.Generator(device="cuda").manual_seed(3)
    state = {"w": torch.randn(2048, 512, device="cuda", generator=g),
             "m": torch.randn(2048, 512, device="cuda", generator=g).bfloat16()}
    dckpt.save(state, str(tmp_path), step=5)
    got = {k: torch.empty_like(v) for k, v in state.items()}
    dckpt.load(got, str(tmp_path), config=dckpt.LoadConfig(read_buffer_bytes=1 << 20))
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def _full(step: int) -> torch.Tensor:
    return torch.randn(16, 4096, generator=torch.Generator().manual_seed(step))


def _save_sharded(rank, world, url):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    replicated = torch.randn(256, 1024, generator=torch.Generator().manual_seed(9))
    dckpt.save({"w": distribute_tensor(_full(1), mesh, [Shard(0)]), "r": replicated},
               url, step=1)


def _load_onto_cuda(rank, world, url, mode):
    # CUDA destinations on gloo ranks: each rank's box is a slice of a shard saved by
    # another world size; the replicated tensor is read once and broadcast via the host
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cuda", (world,))
    rows = 16 // world
    local = torch.zeros(rows, 4096, device="cuda")
    state = {"w": DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                     shape=torch.Size([16, 4096]), stride=(4096, 1)),
             "r": torch.zeros(256, 1024, device="cuda")}
    info = dckpt.load(state, url, config=dckpt.LoadConfig(replicated=mode))
    want_r = torch.randn(256, 1024, generator=torch.Generator().manual_seed(9))
    mine = _full(1)[rank * rows:(rank + 1) * rows]
    return (info.step, bool(torch.equal(state["w"].to_local().cpu(), mine)),
            bool(torch.equal(state["r"].cpu(), want_r)), info.bytes_read)


def test_resharded_and_read_once_onto_cuda_on_gloo_ranks(tmp_path):
    url = str(tmp_path)
    run_ranks(_save_sharded, 2, url)
    read = [o.value for o in run_ranks(_load_onto_cuda, 4, url, "read")]
    once = [o.value for o in run_ranks(_load_onto_cuda, 4, url, "broadcast")]
    assert [v[:3] for v in read + once] == [(1, True, True)] * 8
    # bytes_read sums all ranks: the replicated tensor read by 4 ranks, against by 1
    assert read[0][3] - once[0][3] == 3 * 256 * 1024 * 4


def test_load_into_a_cuda_models_parameters_that_require_grad(tmp_path):
    """``named_parameters()``: leaves that require grad take no in-place copy but detached."""
    torch.manual_seed(0)
    want = torch.nn.Linear(64, 32)
    dckpt.save(dict(want.named_parameters()), str(tmp_path), step=1)
    got = torch.nn.Linear(64, 32).cuda()
    dckpt.load(dict(got.named_parameters()), str(tmp_path))
    assert got.weight.requires_grad and got.weight.is_cuda
    assert torch.equal(got.weight.detach().cpu(), want.weight.detach())
    assert torch.equal(got.bias.detach().cpu(), want.bias.detach())


def test_tied_cuda_tensors_load_once_and_their_twin_stays_on_the_host(tmp_path):
    """A tied key's values are read into a twin on the host (no second copy of a tied
    embedding on the GPU) and compared with the GPU tensor's."""
    emb = torch.randn(100, 16)
    dckpt.save({"emb": emb, "head": emb}, str(tmp_path / "same"), step=1)
    dckpt.save({"emb": emb, "head": emb + 1}, str(tmp_path / "apart"), step=1)
    t = torch.zeros(100, 16, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    dckpt.load({"emb": t, "head": t}, str(tmp_path / "same"))
    assert torch.equal(t.cpu(), emb)
    assert torch.cuda.max_memory_allocated() - before < emb.nbytes  # no twin on the GPU
    with pytest.raises(dckpt.StateDictError, match="head: one tensor with emb"):
        dckpt.load({"emb": t, "head": t}, str(tmp_path / "apart"))


def test_cuda_views_that_overlap_in_part_load_through_host_twins(tmp_path):
    """Each key of two GPU views that share elements is read into a twin on the host, then
    copied into its view; a checkpoint that disagrees on the shared elements is refused."""
    buf = torch.randn(4096)
    url = str(tmp_path / "r")
    dckpt.save({"a": buf[:3072], "b": buf[1024:].view(32, 96)}, url, step=1)
    dckpt.save({"a": buf[:3072], "b": buf[1024:].view(32, 96) + 1}, url, step=2)
    dest = torch.zeros(4096, device="cuda")
    dckpt.load({"a": dest[:3072], "b": dest[1024:].view(32, 96)}, url, step=1)
    assert torch.equal(dest.cpu(), buf)
    with pytest.raises(dckpt.StateDictError, match="elements they share"):
        dckpt.load({"a": dest[:3072], "b": dest[1024:].view(32, 96)}, url, step=2)


@pytest.mark.parametrize("budget", [1 << 30, 4096])
def test_load_into_lazy_conjugates_and_negations_on_cuda(tmp_path, budget):
    # torch 2.11 dropped a lazy negation in a non-blocking copy between host and GPU
    g = torch.Generator().manual_seed(3)
    want = {"conj": torch.randn(700, dtype=torch.complex64, generator=g),
            "neg": torch.randn(700, generator=g), "both": torch.randn(700, dtype=torch.complex64,
                                                                     generator=g)}
    dckpt.save(want, str(tmp_path), step=1)
    z = torch.zeros(700, dtype=torch.complex64, device="cuda")
    w = torch.zeros(700, dtype=torch.complex64, device="cuda")
    got = {"conj": z.conj(), "neg": torch.zeros(700, dtype=torch.complex64,
                                                device="cuda").conj().imag,
           "both": torch._neg_view(w.conj())}
    assert got["neg"].is_neg() and got["both"].is_neg() and got["both"].is_conj()
    dckpt.load(got, str(tmp_path), config=dckpt.LoadConfig(read_buffer_bytes=budget))
    for k, v in want.items():
        assert torch.equal(got[k].resolve_conj().resolve_neg().cpu(), v), k


@pytest.mark.parametrize("pinned_window", [1 << 10, 64 << 10, 64 << 20])
def test_boxes_larger_than_the_pinned_window_go_through_ordinary_memory(tmp_path, monkeypatch,
                                                                        pinned_window):
    """Onto the GPU, boxes up to the pinned window take pinned buffers and asynchronous
    copies, larger ones ordinary memory and blocking copies; both, mixed in one load, with
    the windows read one ahead, deliver every value."""
    from dckpt import reader

    monkeypatch.setattr(reader, "PINNED_WINDOW_BYTES", pinned_window)
    pinned: list[bool] = []
    job = reader.Reader._job

    def recorded(self, *args):
        made = job(self, *args)
        pinned.append(made.pinned)
        return made

    monkeypatch.setattr(reader.Reader, "_job", recorded)
    want = _cpu_state()
    dckpt.save(want, str(tmp_path), step=1)
    got = _cuda_zeros(want)
    dckpt.load(got, str(tmp_path), config=dckpt.LoadConfig(read_buffer_bytes=256 << 10))
    _assert_loaded(got, want)
    assert any(pinned) == (pinned_window >= 64 << 10)  # the small tensors fit 64 KiB
    assert all(pinned) == (pinned_window >= 64 << 20)
