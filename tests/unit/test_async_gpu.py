"""Async save of CUDA state: pinned staging, side-stream copies, overlap, budgets."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dckpt
from dckpt.saver import AsyncSaver

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_state() -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {"w": torch.randn(1024, 1024, device="cuda", generator=g),
            "h": torch.randn(333, 77, device="cuda", generator=g).half(),
            "t": torch.randn(64, 48, device="cuda", generator=g).t(),  # non-contiguous
            "cpu": torch.arange(100), "step": 7}


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
            for k, v in state.items()}


def _load_cpu(url: str, step: int, like: dict) -> dict:
    out = {k: torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else 0
           for k, v in like.items()}
    dckpt.load(out, url, step=step)
    return out


def _assert_equal(got: dict, want: dict) -> None:
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


def _mutate_on_the_stream(state: dict) -> None:
    for v in state.values():
        if isinstance(v, torch.Tensor):
            v.mul_(-1).add_(3)


def test_cuda_state_changed_after_return_is_saved_as_it_was(tmp_path):
    url = str(tmp_path / "repo")
    saver = AsyncSaver()
    state = _cuda_state()
    for step in (1, 2):
        before = _cpu_copy(state)
        _mutate_on_the_stream(state)  # still queued: the staging copy must wait for it
        handle = saver.async_save(state, url, step=step)
        want = {k: v.mul(-1).add(3) if isinstance(v, torch.Tensor) else v
                for k, v in before.items()}
        _mutate_on_the_stream(state)
        handle.wait(timeout=120)
        _assert_equal(_load_cpu(url, step, want), want)
    assert saver._area.pinned and saver._area.allocations == 1
    saver.close()


def test_overlap_mode_lets_the_host_go_on_and_the_stream_wait(tmp_path):
    url = str(tmp_path / "repo")
    saver = AsyncSaver()
    state = _cuda_state()
    want = _cpu_copy(state)
    handle = saver.async_save(state, url, step=1, config=dckpt.SaveConfig(overlap=True))
    handle.wait_staged()  # the current stream waits for the copies; the host does not
    _mutate_on_the_stream(state)
    handle.wait(timeout=120)
    _assert_equal(_load_cpu(url, 1, want), want)
    saver.close()


def test_overlap_mode_with_the_optimizer_hook_on_cuda(tmp_path):
    url = str(tmp_path / "repo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    saver = AsyncSaver()
    hook = saver.install_hook(opt)
    x = torch.randn(64, 256, device="cuda")
    for step in range(1, 4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        want = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        handle = saver.async_save(model.state_dict(), url, step=step,
                                  config=dckpt.SaveConfig(overlap=True))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()  # waits (on the device) for the staged copy first
        handle.wait(timeout=120)
        _assert_equal(_load_cpu(url, step, want), want)
    hook.remove()
    saver.close()


def test_cuda_state_over_the_staging_budget_goes_through_the_window(tmp_path):
    url = str(tmp_path / "repo")
    block = 256 << 10
    config = dckpt.SaveConfig(block_size_bytes=block, staging_bytes=4 * block)
    state = {f"w{i}": torch.randn(300_000 + i, device="cuda") for i in range(3)}  # 1.2 MB each
    want = _cpu_copy(state)
    saver = AsyncSaver()
    handle = saver.async_save(state, url, step=1, config=config)
    _mutate_on_the_stream(state)
    info = handle.wait(timeout=120)
    assert info.overflow_bytes >= 2 * 1_200_000 and saver._area.nbytes <= 4 * block
    _assert_equal(_load_cpu(url, 1, want), want)
    assert dckpt.verify(url).ok
    saver.close()


@pytest.mark.parametrize("budget", [None, 8 << 10])
def test_cuda_conjugate_views_are_saved_by_value(tmp_path, budget):
    url = str(tmp_path / "repo")
    z = torch.randn(5000, dtype=torch.complex64, device="cuda")
    state = {"conj": z.conj(), "neg": z.conj().imag}
    want = {k: v.resolve_conj().resolve_neg().cpu() for k, v in state.items()}
    config = dckpt.SaveConfig(block_size_bytes=4 << 10, staging_bytes=budget)
    saver = AsyncSaver()
    saver.async_save(state, url, step=1, config=config).wait(timeout=120)
    dckpt.save(state, url, step=2)
    for step in (1, 2):
        _assert_equal(_load_cpu(url, step, want), want)
    saver.close()


def test_stager_with_cuda_state_serves_dcp_async_save(tmp_path):
    url = str(tmp_path / "repo")
    stager = dckpt.Stager()
    state = _cuda_state()
    want = _cpu_copy(state)
    future = dcp.async_save(state, storage_writer=dckpt.Writer(url, step=1), async_stager=stager)
    _mutate_on_the_stream(state)
    future.result(timeout=120)
    stager.close()
    _assert_equal(_load_cpu(url, 1, want), want)
