"""2-process gloo DDP on the CPU gives the gradient of 1 process with the whole batch.

The test starts two copies of this file as workers (RANK/WORLD_SIZE as torchrun sets them), each
computing the loop's first-step gradient of the same tiny captioner on its half of the batch (DDP
all-reduces them), then training one step; rank 0 writes the run folder.
Gradients, not weights after one AdamW step: that step is about lr * sign(g) and cannot see a loss
scaled by the wrong factor (dividing by the world size twice fails this test; checked by hand).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def _worker(root: str, name: str, batch_size: int, grad_accum: int) -> None:
    sys.path.insert(0, str(TESTS))
    from safetensors.torch import save_file
    from test_train import first_step_gradients, quick, tiny_captioner

    from vgpt_cli.train import train
    from vgpt_cli.workspace import Workspace

    ws = Workspace(Path(root))
    grads = first_step_gradients(ws, tiny_captioner(), batch_size=batch_size, grad_accum=grad_accum)
    save_file(grads, str(Path(root) / f"grads-{name}-r{os.environ['RANK']}.safetensors"))
    train(quick(batch_size=batch_size, grad_accum=grad_accum, name=name), ws, model=tiny_captioner(), quiet=True,
          keep_last=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_gives_the_gradient_of_one_process(tmp_path):
    import torch
    from safetensors.torch import load_file
    from test_train import (
        first_step_gradients,
        make_workspace,
        max_diff,
        quick,
        relative_diff,
        tiny_captioner,
    )

    from vgpt_cli.train import train

    ws = make_workspace(tmp_path, n_train=8, caps_per_item=2)  # 16 captions
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
        # 2 processes x batch 4 x accum 2 = 16 captions per step (also exercises no_sync)
        procs.append(subprocess.Popen([sys.executable, __file__, str(ws.root), "ddp", "4", "2"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1)
    try:
        one_grads = first_step_gradients(ws, tiny_captioner(), batch_size=16, grad_accum=1)
        train(quick(batch_size=16, grad_accum=1, name="one"), ws, model=tiny_captioner(), quiet=True, keep_last=True)
    finally:
        torch.set_num_threads(before)
    for rank in range(2):  # after the all-reduce every process holds the whole batch's gradient
        ddp_grads = load_file(str(ws.root / f"grads-ddp-r{rank}.safetensors"))
        assert ddp_grads.keys() == one_grads.keys()
        assert relative_diff(ddp_grads, one_grads) <= 1e-5
        assert relative_diff({k: 2 * v for k, v in ddp_grads.items()}, one_grads) > 0.5  # the scale is seen
    ddp = load_file(str(ws.run_dir("ddp") / "last" / "model.safetensors"))
    one = load_file(str(ws.run_dir("one") / "last" / "model.safetensors"))
    start = {k: v for k, v in tiny_captioner().state_dict().items() if k in one}
    assert max_diff(one, start) > 1e-4  # one step moved the parameters
    assert max_diff(ddp, one) <= 1e-5
    # only rank 0 wrote files
    assert sorted(p.name for p in ws.run_dir("ddp").iterdir()) == ["best", "config.json", "curves.png", "last",
                                                                   "metrics.jsonl", "result.json"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
