#!/usr/bin/env python3
"""A small real DGL distributed training job: DistGraph + DistNodeDataLoader + a 2-layer
GraphSAGE wrapped in DistributedDataParallel (gloo), a few steps.

Run by scripts/e2e-real-dgl.sh under `dgl-coord launch` (both trainer modes); modelled on DGL's
examples/distributed/graphsage/node_classification.py. The same file is every role: DGL servers
(DGL_ROLE=server) never return from dgl.distributed.initialize(); samplers are forked by it.

Each trainer prints, for the test to check:
    E2E_START rank=R world=W machine_ip=IP ...
    E2E_INIT rank=R t=T       (wall-clock time when dgl.distributed.initialize returned)
    E2E_FIRST_STEP rank=R t=T (wall-clock time when the first training step finished)
    E2E_LOSS rank=R epoch=E step=S loss=X
    E2E_DONE rank=R steps=N first_loss=X last_loss=Y
"""
import argparse
import os
import socket
import sys
import time

import dgl
import dgl.nn.pytorch as dglnn
import torch
import torch.nn as nn
import torch.nn.functional as F


class SAGE(nn.Module):
    def __init__(self, in_feats, n_hidden, n_classes):
        super().__init__()
        self.layers = nn.ModuleList(
            [dglnn.SAGEConv(in_feats, n_hidden, "mean"), dglnn.SAGEConv(n_hidden, n_classes, "mean")]
        )

    def forward(self, blocks, x):
        h = x
        for i, (layer, block) in enumerate(zip(self.layers, blocks)):
            h = layer(block, h)
            if i != len(self.layers) - 1:
                h = F.relu(h)
        return h


def say(line):
    """Prints one line with a single write(2), so that lines of trainers sharing one pipe (the
    workers of one torchrun) are never spliced together."""
    os.write(1, (line + "\n").encode())


def local_ip(peer):
    """The address this host uses to reach `peer` (its address in its network namespace)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return "?"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--graph_name", required=True)
    p.add_argument("--ip_config", required=True)
    p.add_argument("--part_config", default=None)
    p.add_argument("--num_epochs", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=4, help="training steps per epoch (at most)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--fan_out", default="5,10")
    p.add_argument("--num_hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--num_classes", type=int, default=4, help="as partition_graph.py --classes")
    p.add_argument("--fail_on_first_attempt", action="store_true",
                   help="rank 0 exits 5 after its start line unless DGLRUN_RESTART_COUNT > 0")
    args = p.parse_args()

    dgl.distributed.initialize(args.ip_config)  # servers never return from here
    t_init = time.time()
    torch.distributed.init_process_group(backend="gloo")
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    # Hosts share one clock (namespaces of one machine): scripts/e2e-first-step.sh subtracts
    # the time it started the launcher.
    say(f"E2E_INIT rank={rank} t={t_init:.3f}")
    torch.manual_seed(0)

    g = dgl.distributed.DistGraph(args.graph_name, part_config=args.part_config)
    pb = g.get_partition_book()
    train_nid = dgl.distributed.node_split(g.ndata["train_mask"], pb, force_even=True)
    ip = local_ip(os.environ.get("MASTER_ADDR", "198.18.0.1"))
    say(
        f"E2E_START rank={rank} world={world} machine_ip={ip} partition={pb.partid} "
        f"local_rank={os.environ.get('LOCAL_RANK')} group_rank={os.environ.get('GROUP_RANK')} "
        f"train_nodes={len(train_nid)} num_samplers={os.environ.get('DGL_NUM_SAMPLER')} "
        f"pid={os.getpid()}"
    )
    if args.fail_on_first_attempt and rank == 0:
        restarts = int(os.environ.get("DGLRUN_RESTART_COUNT", "0"))
        say(f"E2E_ATTEMPT rank={rank} restart_count={restarts}")
        if restarts == 0:
            sys.exit(5)

    sampler = dgl.dataloading.NeighborSampler([int(f) for f in args.fan_out.split(",")])
    dataloader = dgl.dataloading.DistNodeDataLoader(
        g, train_nid, sampler, batch_size=args.batch_size, shuffle=True, drop_last=False
    )
    # DDP needs every rank to take the same number of steps: the fewest any rank has.
    num_batches = (len(train_nid) + args.batch_size - 1) // args.batch_size
    steps = torch.tensor([min(num_batches, args.max_steps)])
    torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
    steps = int(steps)
    if steps == 0:
        say(f"E2E_ERROR rank={rank} no training batch on some rank")
        sys.exit(3)

    in_feats = g.ndata["feat"].shape[1]
    n_classes = args.num_classes  # checked below against the labels
    model = torch.nn.parallel.DistributedDataParallel(SAGE(in_feats, args.num_hidden, n_classes))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    losses = []
    t0 = time.time()
    for epoch in range(args.num_epochs):
        model.train()
        # The whole epoch is iterated (so the loader's sampler workers finish cleanly), the
        # first `steps` batches are trained on.
        for step, (input_nodes, seeds, blocks) in enumerate(dataloader):
            if step >= steps:
                continue
            x = g.ndata["feat"][input_nodes]
            y = g.ndata["label"][seeds].long()
            assert int(y.max()) < n_classes, "labels out of range"
            loss = F.cross_entropy(model(blocks, x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == 1:
                say(f"E2E_FIRST_STEP rank={rank} t={time.time():.3f}")
            say(
                f"E2E_LOSS rank={rank} epoch={epoch} step={step} loss={loss.item():.4f} "
                f"batch={len(seeds)} inputs={len(input_nodes)}"
            )
    # The parameters must be the same on every rank after DDP.
    flat = torch.cat([q.detach().flatten() for q in model.parameters()])
    mx, mn = flat.clone(), flat.clone()
    torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(mn, op=torch.distributed.ReduceOp.MIN)
    if not torch.equal(mx, mn):
        say(f"E2E_ERROR rank={rank} parameters differ between ranks")
        sys.exit(3)
    say(
        f"E2E_DONE rank={rank} steps={len(losses)} first_loss={losses[0]:.4f} "
        f"last_loss={losses[-1]:.4f} seconds={time.time() - t0:.1f}"
    )
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
