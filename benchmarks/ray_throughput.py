"""``python -m benchmarks.ray_throughput --requests 8 --model dummy-sd --steps 10``

Throughput of N concurrent requests on 1 vs 2 Ray workers (ratio from the same run),
and the per-request overhead of the Ray path over the in-process LocalExecutor on a
near-empty request (1 step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def timed_concurrent(executor, requests) -> float:
    threads = [threading.Thread(target=executor.run, args=(r,)) for r in requests]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main(argv=None) -> int:
    import ray

    from backends.executor import LocalExecutor, RayExecutor
    from backends.manager import BackendManager
    from backends.tiny.dummy import register_dummy_models
    from backends.types import Request

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_throughput")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--model", default="dummy-sd")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    requests = [Request("image", args.model, f"request {i}", seed=i, params={"steps": args.steps})
                for i in range(args.requests)]
    dummy = args.model.startswith("dummy-")
    # three actors on a 2-CPU Ray instance: reserve half a CPU each so all can be placed
    one = RayExecutor(num_workers=1, device="cpu", dummy_models=dummy, cpus_per_worker=0.5)
    two = RayExecutor(num_workers=2, device="cpu", dummy_models=dummy, cpus_per_worker=0.5)
    for executor in (one, two):  # load the model on every worker first
        timed_concurrent(executor, requests[:len(executor.workers)])
    t1, t2 = [], []
    for _ in range(args.repeats):
        t1.append(timed_concurrent(one, requests))
        t2.append(timed_concurrent(two, requests))
    manager = BackendManager(device="cpu")
    if dummy:
        register_dummy_models(manager)
    local = LocalExecutor(manager)
    tiny = Request("image", args.model, "overhead", seed=0, params={"steps": 1})
    local.run(tiny)
    local_s, ray_s = [], []
    for _ in range(20):
        start = time.perf_counter()
        local.run(tiny)
        local_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        one.run(tiny)
        ray_s.append(time.perf_counter() - start)
    m1, m2 = statistics.median(t1), statistics.median(t2)
    print(f"{args.requests} concurrent requests ({args.steps} steps): 1 worker {m1:.3f}s, 2 workers {m2:.3f}s, "
          f"throughput ratio {m1 / m2:.2f}x")
    overhead_ms = 1000 * (statistics.median(ray_s) - statistics.median(local_s))
    print(f"per-request overhead of Ray over local (1-step request): {overhead_ms:.1f} ms "
          f"(local {1000 * statistics.median(local_s):.1f} ms, ray {1000 * statistics.median(ray_s):.1f} ms)")
    one.shutdown()
    two.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
