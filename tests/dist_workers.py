"""Functions run on several gloo ranks by `spawn` (they must be importable for multiprocessing)."""
import os
import socket

import torch
import torch.multiprocessing as mp


def spawn(fn, world_size: int, *args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(fn, world_size, port, args), nprocs=world_size, join=True)


def _entry(rank, fn, world_size, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fn(rank, *args)


def clip_matches_unsharded(rank, out_dir):
    from vit.distributed import close, init_distributed
    from vit.model import build_model
    from vit.optim import clip_grad_norm_
    from vit.parallel import shard_model

    world = init_distributed("cpu")
    torch.manual_seed(0)
    reference = build_model("vit_tiny_patch16", num_classes=5, img_size=32)
    sharded = build_model("vit_tiny_patch16", num_classes=5, img_size=32)
    sharded.load_state_dict(reference.state_dict())
    shard_model(sharded, world, "fp32")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference(x).square().sum().backward()
    # each rank feeds the same batch, so the averaged sharded gradient equals the reference one
    sharded(x).square().sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    norm = clip_grad_norm_(list(sharded.parameters()), 0.5)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    for p_ref, p in zip(reference.parameters(), sharded.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), p_ref.grad, rtol=1e-5, atol=1e-7)
    if rank == 0:
        (out_dir / "ok").write_text(f"{norm.item()}")
    close()
