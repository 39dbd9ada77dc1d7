"""A sweep's training: every member steps on each global batch, read once.

One feed reads each batch (converted and moved to the device once); every member (a `Trainer` without a loop of
its own) steps on it in grid order. A member therefore sees exactly the batches, in the order, of the single run
with its config, and ends equal to it. Placement "batch" splits every batch across the ranks and each member is
DDP-wrapped as a single run is; placement "members" gives member i to rank i % world_size, which trains it on
whole batches alone (no gradient all-reduce; every rank reads every batch).

Each member writes its own complete SAE folder (`OUT/<name>/`, what a single run writes, checkpoints included).
A sweep checkpoints every member at the same steps and keeps one checkpoint more than asked, so a kill between
two members' writes still leaves a step every member has; `--resume` continues from the newest such step. A
member whose loss stops being finite (seen at a log step, from figures reduced over the ranks, so every rank
agrees) is stopped with its reason in its error.txt; the others go on. `sweep.json` (members, placement) is
written first, `sweep_result.json` (each member's status and figures) last.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import CHECKPOINT_STATE, REFUSED_FILE, SWEEP_FILE, SWEEP_RESULT_FILE
from ..outputs import checkpoint_problem, complete_checkpoints, sweep_members
from ..sweep import Sweep
from .checkpoint import CheckpointError
from .distributed import DistEnv
from .sinks import MetricsSink
from .trainer import Trainer, data_order, open_feed


class SharedSink:
    """A sink several members write to (the job store's): each member's close is not the sink's."""

    def __init__(self, sink: MetricsSink):
        self.sink = sink

    def write(self, record: dict) -> None:
        self.sink.write(record)

    def close(self) -> None:
        pass


class SweepTrainer:
    def __init__(
        self,
        sweep: Sweep,
        out_dir: Path,
        env: DistEnv,
        data,
        resume_from: Path | None = None,
        extra_sinks: Callable[[], list[MetricsSink]] | None = None,
        stream=None,
    ):
        """`stream` (model/stream.py's Stream): every member's rows come from one model's forward passes."""
        self.sweep, self.out_dir, self.env, self.data = sweep, out_dir, env, data
        self.cfg = sweep.shared  # the batch, the loop's cadence and the data order are every member's
        self.by_batch = sweep.placement != "members" or env.world_size == 1
        ranks, rank = (env.world_size, env.rank) if self.by_batch else (1, 0)
        self.order = stream.order if stream is not None else data_order(self.cfg, data)
        owned = [m for i, m in enumerate(sweep.members) if self.by_batch or i % env.world_size == env.rank]
        writes = env.is_main if self.by_batch else True
        self.shared_sinks = (extra_sinks() if extra_sinks else []) if writes and owned else []
        if env.is_main:
            self.write_plan()
        self.failed: dict[str, str] = {}
        resumed = self.resume_points(resume_from) if resume_from is not None else {}
        first = None
        if resume_from is None and stream is not None:
            first = stream.feed.first_batch()
        elif resume_from is None:  # the first global batch, read once: every member initialises from it
            first = torch.from_numpy(data.read(self.order.global_rows(self.order.key))).to(env.device)
        self.members: dict[str, Trainer] = {}
        feed = (self.order, None)
        for member in owned:
            if resume_from is not None and member.name not in resumed:
                continue  # it had failed before the interruption: it stays failed
            member_data, target_data = data, None
            if stream is not None:  # its hook's held-out rows (a transcoder's: its module's input and output)
                member_data = stream.holdout[member.config.input_key]
                target_data = stream.holdout.get(member.config.target_key)
            self.members[member.name] = Trainer(
                member.config,
                member.folder(out_dir),
                env,
                member_data,
                resumed.get(member.name),
                lambda: [SharedSink(sink) for sink in self.shared_sinks],
                feed=feed,  # type: ignore[arg-type]  # the reader is set below, once the members exist
                first=first,
                collective=self.by_batch,
                writes=writes,
                name=member.name,
                target_data=target_data,
            )
        del first
        if resumed:  # the data order every member's checkpoint holds alike
            state = json.loads((next(iter(resumed.values())) / CHECKPOINT_STATE).read_text())
            self.order.load_state_dict(state["data"])
        self.reader = stream.feed if stream is not None else open_feed(self.cfg, data, self.order, env, rank, ranks)
        for trainer in self.members.values():
            trainer.reader = self.reader
        self.step = next(iter(self.members.values())).step if self.members else 0
        self.step_seconds = dict.fromkeys(self.members, 0.0)  # each member's own step time, for the bench
        self.loop_seconds = 0.0

    # -- the plan, the resume point
    def write_plan(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        plan = {
            "placement": "batch" if self.by_batch else "members",
            "world_size": self.env.world_size,
            "members": [{"name": m.name, "overrides": m.overrides} for m in self.sweep.members],
        }
        (self.out_dir / SWEEP_FILE).write_text(json.dumps(plan, indent=2))

    def resume_points(self, run_dir: Path) -> dict[str, Path]:
        """Each member still training's checkpoint at the newest step every one of them has intact."""
        steps: dict[str, dict[int, Path]] = {}
        for member in self.sweep.members:
            folder = member.folder(run_dir)
            if (folder / REFUSED_FILE).exists():  # it failed before: it stays failed, for the same reason
                reason = (folder / REFUSED_FILE).read_text().strip()
                self.failed[member.name] = reason
                if self.env.is_main and folder != member.folder(self.out_dir):
                    member.folder(self.out_dir).mkdir(parents=True, exist_ok=True)
                    (member.folder(self.out_dir) / REFUSED_FILE).write_text(reason + "\n")
                continue
            steps[member.name] = {
                int(p.name.split("_")[-1]): p for p in complete_checkpoints(folder) if checkpoint_problem(p) is None
            }
        common = set.intersection(*(set(found) for found in steps.values())) if steps else set()
        if not common:
            raise CheckpointError(f"--resume: no step at which every member of the sweep in {run_dir} has a checkpoint")
        step = max(common)
        if self.env.is_main:
            print(f"resume: every member from step {step}", flush=True)
        return {name: found[step] for name, found in steps.items()}

    # -- the loop
    def run(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        elapsed = next(iter(self.members.values())).elapsed if self.members else 0.0
        last_log_time, last_log_step = start, self.step
        outputs: dict[str, tuple] = {}
        try:
            while self.step < cfg.total_steps and self.members:
                batch = self.reader.next()
                for name, trainer in self.members.items():
                    began = time.perf_counter()
                    outputs[name] = trainer.step_on(batch)
                    self.step_seconds[name] += time.perf_counter() - began
                self.step += 1
                is_last = self.step == cfg.total_steps
                if self.step % cfg.log_every == 0 or is_last:
                    now = time.perf_counter()
                    seconds = max(now - last_log_time, 1e-9)
                    tokens_per_s = (self.step - last_log_step) * cfg.batch_size / seconds
                    eta_s = (cfg.total_steps - self.step) * cfg.batch_size / max(tokens_per_s, 1e-9)
                    self.log(outputs, tokens_per_s, eta_s, seconds)
                    last_log_time, last_log_step = now, self.step
                if self.step % cfg.checkpoint_every == 0 or is_last:
                    for trainer in self.members.values():
                        trainer.save_checkpoint(elapsed + time.perf_counter() - start, cfg.keep_checkpoints + 1)
        finally:
            self.reader.close()
        self.loop_seconds = time.perf_counter() - start
        outputs.clear()
        train_seconds = elapsed + time.perf_counter() - start
        for trainer in self.members.values():
            trainer.finish(train_seconds, barrier=False)
        for sink in self.shared_sinks:
            sink.close()
        if dist.is_initialized():
            dist.barrier()
        return self.write_result() if self.env.is_main else {}

    def log(self, outputs: dict[str, tuple], tokens_per_s: float, eta_s: float, seconds: float) -> None:
        for name, trainer in list(self.members.items()):
            x, out = outputs[name]
            record = trainer.log(x, out, tokens_per_s, eta_s, trainer.data_wait(seconds))
            if not math.isfinite(record["loss"]):
                self.fail(name, f"the loss is not finite at step {self.step} ({record['loss']})")

    def fail(self, name: str, reason: str) -> None:
        """Stop member `name` (every rank that holds it does, from the same reduced figures) and say why."""
        trainer = self.members.pop(name)
        self.failed[name] = reason
        if trainer.writes:
            trainer.out_dir.mkdir(parents=True, exist_ok=True)
            (trainer.out_dir / REFUSED_FILE).write_text(reason + "\n")
            for sink in trainer.sinks:
                sink.close()
            print(f"member {name} failed: {reason}", file=sys.stderr, flush=True)

    def write_result(self) -> dict:
        """sweep_result.json from the members' folders (a member on another rank wrote its own); last."""
        members = [
            {"name": m.name, "status": m.status, "error": m.error, "eval": m.figures or None}
            for m in sweep_members(self.out_dir)
        ]
        result = {"members": members}
        (self.out_dir / SWEEP_RESULT_FILE).write_text(json.dumps(result, indent=2))
        done = sum(m["status"] == "completed" for m in members)
        print(f"sweep: {done} of {len(members)} members completed", flush=True)
        return result
