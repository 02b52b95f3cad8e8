"""Baseline for `flotilla bench nccl`: the same ops, sizes and timing through torch.distributed.

Usage: python3 torch_nccl.py [NGPUS]   (prints JSON lines like flotilla's, "impl": "torch")
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def iters(nbytes):
    return 20 if nbytes >= 16 << 20 else 100


def worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    n = float(world)
    for nbytes in SIZES:
        elems = nbytes // 4
        send = torch.zeros(elems, device="cuda")
        recv = torch.zeros(elems, device="cuda")
        per_peer = elems // world
        for op, factor in (("all_reduce", 2 * (n - 1) / n), ("all_to_all", (n - 1) / n)):
            def run():
                if op == "all_reduce":
                    dist.all_reduce(send)
                else:
                    dist.all_to_all_single(recv[: per_peer * world], send[: per_peer * world])
            for _ in range(5):
                run()
            dist.barrier()
            torch.cuda.synchronize()
            k = iters(nbytes)
            t = time.perf_counter()
            for _ in range(k):
                run()
            torch.cuda.synchronize()
            secs = (time.perf_counter() - t) / k
            moved = per_peer * world * 4 if op == "all_to_all" else nbytes
            algbw = moved / secs / 1e9
            if rank == 0:
                print(json.dumps({"bench": "nccl", "impl": "torch", "op": op, "ranks": world, "bytes": moved,
                                  "time_us": secs * 1e6, "algbw_gbs": algbw, "busbw_gbs": algbw * factor}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    world = int(sys.argv[1]) if len(sys.argv) > 1 else torch.cuda.device_count()
    mp.spawn(worker, args=(world, 29512), nprocs=world)
