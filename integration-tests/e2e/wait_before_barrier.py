"""A real DistDGL trainer that stops before its barrier: `dgl-coord stacks` must name
`wait_before_barrier` for it (integration-tests/tests/stacks.rs, opt-in).

Servers run DGL's own server loop; the trainer initialises DGL (with its samplers), joins the
gloo group, opens the DistGraph, prints E2E_WAITING and sleeps in `wait_before_barrier`.
"""

import argparse
import time

import dgl
import torch


def wait_before_barrier():
    print("E2E_WAITING", flush=True)
    while True:
        time.sleep(3600)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--graph_name", required=True)
    p.add_argument("--ip_config", required=True)
    args = p.parse_args()
    dgl.distributed.initialize(args.ip_config)  # servers never return from here
    torch.distributed.init_process_group(backend="gloo")
    dgl.distributed.DistGraph(args.graph_name)
    wait_before_barrier()
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
