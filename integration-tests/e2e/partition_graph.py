#!/usr/bin/env python3
"""Generates a small random graph and partitions it with DGL's real partition_graph.

Used by scripts/e2e-real-dgl.sh (the opt-in real-DGL end-to-end test). The graph is made
learnable on purpose: a node's label is the argmax of a fixed projection of its features, so
the training script's loss goes down in a few steps.

    python3 partition_graph.py --out DIR --parts 3 --graph-name e2e [--nodes 4000] [--method metis]

Writes DIR/<graph-name>.json (the part_config) and DIR/part<i>/... as DGL does.
"""
import argparse

import dgl
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory of the partitions")
    p.add_argument("--parts", type=int, required=True, help="number of partitions (machines)")
    p.add_argument("--graph-name", default="e2e")
    p.add_argument("--nodes", type=int, default=4000)
    p.add_argument("--avg-degree", type=int, default=8)
    p.add_argument("--feat-dim", type=int, default=16)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--method", choices=["metis", "random"], default="metis")
    p.add_argument("--num-trainers-per-machine", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    dgl.seed(args.seed)
    n = args.nodes
    g = dgl.rand_graph(n, n * args.avg_degree // 2)
    # Undirected, no duplicate edges, and no isolated node (a ring through every node).
    ring_src = torch.arange(n)
    g = dgl.add_edges(g, ring_src, (ring_src + 1) % n)
    g = dgl.to_bidirected(g)

    feat = torch.randn(n, args.feat_dim)
    proj = torch.randn(args.feat_dim, args.classes)
    g.ndata["feat"] = feat
    g.ndata["label"] = (feat @ proj).argmax(dim=1)
    g.ndata["train_mask"] = torch.rand(n) < 0.6
    print(
        f"graph: {g.num_nodes()} nodes, {g.num_edges()} edges, "
        f"{int(g.ndata['train_mask'].sum())} training nodes, {args.classes} classes",
        flush=True,
    )

    dgl.distributed.partition_graph(
        g,
        args.graph_name,
        args.parts,
        args.out,
        part_method=args.method,
        balance_ntypes=g.ndata["train_mask"],
        balance_edges=True,
        num_trainers_per_machine=args.num_trainers_per_machine,
    )
    print(f"partitioned into {args.parts} parts ({args.method}) under {args.out}", flush=True)


if __name__ == "__main__":
    main()
