"""Functions run on several gloo ranks by `spawn` (they must be importable for multiprocessing)."""
import os
import socket
import sys
from pathlib import Path

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
    fn(rank, *args)  # a failure raises here and reaches mp.spawn as before
    # Done and the group closed: skip interpreter teardown, where gloo's native threads have been
    # seen to abort a finished worker ("terminate called without an active exception"), as
    # vit.cluster.worker does for its workers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def clip_matches_unsharded(rank, out_dir):
    from vit.engine.distributed import close, init_distributed
    from vit.engine.optim import clip_grad_norm_
    from vit.engine.parallel import shard_model
    from vit.models.vit import build_model

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


def accumulation_syncs_once(rank, out_dir):
    """3 micro-batches under the recipe's wrapping: one all-gather and one reduce-scatter per unit
    and step instead of one per micro-batch, for the same update."""
    import torch.distributed as dist

    from vit.engine.distributed import close, init_distributed
    from vit.engine.optim import build_optimizer
    from vit.engine.parallel import shard_model
    from vit.engine.train import train_step
    from vit.models.vit import build_model

    world = init_distributed("cpu")
    calls = {"all_gather_single": 0, "reduce_scatter_single": 0}
    for name in calls:
        def counted(*a, _f=getattr(dist, name), _name=name, **k):
            calls[_name] += 1
            return _f(*a, **k)
        setattr(dist, name, counted)
    gen = torch.Generator().manual_seed(rank)
    micro_batches = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 5, (2,), generator=gen))
                     for _ in range(3)]
    results = {}
    for sync_once in (True, False):
        torch.manual_seed(0)
        model = build_model("vit_tiny_patch16", num_classes=5, img_size=32)
        shard_model(model, world, "fp32", unit_blocks=4, reshard_after_forward=False)
        optimizer = build_optimizer(model, 1e-3, 0.05)
        train_step(model, optimizer, micro_batches, world.device, sync_once=sync_once)  # warm-up: lazy init
        for name in calls:
            calls[name] = 0
        loss, norm = train_step(model, optimizer, micro_batches, world.device, sync_once=sync_once)
        params = [p.full_tensor() for p in model.parameters()]
        results[sync_once] = (dict(calls), loss, norm, params)
    (once, loss1, norm1, params1), (each, loss3, norm3, params3) = results[True], results[False]
    units = 12 // 4 + 1  # and the root
    assert once == {"all_gather_single": units, "reduce_scatter_single": units}, once
    assert each == {"all_gather_single": 3 * units, "reduce_scatter_single": 3 * units}, each
    torch.testing.assert_close(loss1, loss3, rtol=1e-6, atol=0)
    torch.testing.assert_close(norm1, norm3, rtol=1e-5, atol=0)
    for a, b in zip(params1, params3):  # the sums differ in order: within 1% of one AdamW update (lr 1e-3)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if rank == 0:
        (out_dir / "ok").write_text(f"{once} {each}")
    close()


class InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def nonfinite_step_is_skipped(rank, out_dir):
    """A micro-batch whose gradient is not finite on one rank leaves every rank's weights and AdamW
    state bitwise as they were; the next finite step trains as usual."""
    from vit.engine.distributed import close, init_distributed
    from vit.engine.optim import build_optimizer
    from vit.engine.parallel import shard_model
    from vit.engine.train import train_step
    from vit.models.vit import build_model
    from vit.tasks.classification import classification_loss

    world = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16", num_classes=5, img_size=32)
    shard_model(model, world, "fp32")
    optimizer = build_optimizer(model, 1e-3, 0.05)
    gen = torch.Generator().manual_seed(rank)
    batch = [(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 5, (2,), generator=gen))]

    def poisoned(m, x, y):  # on rank 1 only: the loss stays finite, its gradient does not
        logits = m(x)
        return classification_loss(InfiniteGradient.apply(logits) if rank else logits, y)

    def snapshot():
        state = [v.to_local().clone() if hasattr(v, "to_local") else v.clone()
                 for s in optimizer.state.values() for v in s.values()]
        return [p.to_local().clone() for p in model.parameters()], state

    train_step(model, optimizer, batch, world.device)
    before = snapshot()
    loss, norm = train_step(model, optimizer, batch, world.device, loss_fn=poisoned)
    after = snapshot()
    assert torch.isfinite(loss) and not torch.isfinite(norm)
    for a, b in zip(before[0] + before[1], after[0] + after[1], strict=True):
        assert torch.equal(a, b)
    _, norm = train_step(model, optimizer, batch, world.device)
    assert torch.isfinite(norm)
    assert all(torch.isfinite(p.to_local()).all() for p in model.parameters())
    assert not all(torch.equal(a, p.to_local()) for a, p in zip(after[0], model.parameters()))
    if rank == 0:
        (out_dir / "ok").write_text("skipped")
    close()


def coco_scoring_failure_fails_every_rank(rank, root, out_dir):
    """Only rank 0 scores (COCOeval); its failure must reach the others, or they hang in the next step."""
    from helpers import data_config, recipe

    import vit.tasks
    import vit.tasks.coco
    from vit.data.sources import build_source
    from vit.engine.distributed import close, init_distributed

    world = init_distributed("cpu")
    source = build_source(data_config("coco", root=root, img_size=64), "val")
    task = vit.tasks.build_task(recipe("task=coco", "task.masks=false", "train.micro_batch=2", "data.num_workers=0",
                                       config="finetune"))

    def nothing_found(images, image_sizes):
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
                for _ in images]

    def broken_scoring(*args):
        raise KeyError("info")

    vit.tasks.coco.coco_ap = broken_scoring
    try:
        task.evaluate(nothing_found, source, world)
    except RuntimeError as e:
        assert "COCO evaluation of" in str(e) and "KeyError" in str(e), e
        (Path(out_dir) / f"raised-{rank}").touch()
    close()
