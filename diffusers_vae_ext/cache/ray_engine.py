"""`--engine ray`: the same units of work on a Ray cluster (one machine or many).

- Encoder actors, one per GPU when the cluster has GPUs, else one per two CPUs: the VAE is loaded once per actor.
- Each unit's reader half (`unit.read_unit`: read, hash, probe, bucket, decode) runs in a Ray task that streams
  its messages (a streaming generator, with backpressure) to the actor encoding the unit.
- Failures: a dead actor is restarted by Ray and its unit retried (`max_restarts`, `max_task_retries`); any other
  failed unit is resubmitted by the driver up to `max_unit_retries` times. A unit redone from scratch overwrites
  the same objects with the same bytes, so retries never duplicate a sample.

Stored tensors equal those of a single-process local run of the same inputs: the batches are the same (planned
inside the unit) and each actor runs the same kernels. On CPU that needs the same number of torch threads: actors
use `torch_threads` (default 1, their one reserved CPU), so compare with a local run at 1 thread.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from tqdm.auto import tqdm

from ..optional import require
from .context import UnitContext
from .sources import Source, Unit
from .unit import Encoder, ObjectWriter, UnitResult, encode_messages, read_unit


def import_ray():
    """The `ray` module, or a `MissingDependencyError` (an ImportError) naming the pip command."""
    return require("ray", "--engine ray")


def _read_unit_task(source: Source, unit: Unit, ctx: UnitContext):
    """The reader half of a unit, as a Ray streaming generator task."""
    yield from read_unit(source, unit, ctx)


class _UnitEncoderActor:
    """Holds one encoder; `encode_unit` runs the writer half of a unit fed by a reader task."""

    def __init__(self, vae: torch.nn.Module, ctx: UnitContext, source_ref: list, torch_threads: int) -> None:
        import ray

        torch.set_num_threads(torch_threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.ctx, self.source_ref = ctx, source_ref[0]  # a reference in a list: Ray does not resolve it here
        self.encoder = Encoder(vae, device, ctx.settings)
        self.writer = ObjectWriter()
        self.reader = ray.remote(num_cpus=1, max_retries=0)(_read_unit_task)

    def encode_unit(self, unit: Unit) -> UnitResult:
        import ray

        try:
            stream = self.reader.options(num_returns="streaming", _generator_backpressure_num_objects=8).remote(
                self.source_ref, unit, self.ctx
            )
        except TypeError:  # a Ray without generator backpressure
            stream = self.reader.options(num_returns="streaming").remote(self.source_ref, unit, self.ctx)
        messages = (ray.get(ref) for ref in stream)
        (result,) = encode_messages(messages, self.ctx, self.encoder, self.writer)
        self.writer.wait()  # the manifest is published before the driver hears about the unit
        return result


def run_ray_engine(
    source: Source,
    ctx: UnitContext,
    vae: torch.nn.Module,
    *,
    address: str | None = None,
    num_encoders: int | None = None,
    torch_threads: int = 1,
    max_unit_retries: int = 3,
    progress: bool = True,
) -> int:
    """Encode every unit of `source` on a Ray cluster; returns the number of samples encoded now.

    Args:
        source, ctx, vae: the run's source, unit context and VAE (shipped once to each actor).
        address: the cluster to join (`"auto"`, `"ray://head:10001"`); None: the already initialised one, else a
            new local cluster (shut down at the end).
        num_encoders: encoder actors (default: one per GPU, else one per two CPUs).
        torch_threads: torch threads per CPU actor.
        max_unit_retries: resubmissions of a unit whose attempt failed (dead actors are also restarted by Ray).
        progress: a tqdm bar over units.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if num_encoders is None:
            num_encoders = gpus or max(1, int(resources.get("CPU", 1)) // 2)
        options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 3, "max_task_retries": 3}
        if gpus:
            options["num_gpus"] = 1
        actor_class = ray.remote(_UnitEncoderActor)
        device = next(vae.parameters()).device
        vae_ref, source_ref = ray.put(vae.cpu()), ray.put(source)  # actors may have no GPU, or another one
        vae.to(device)
        actors = [
            actor_class.options(**options).remote(vae_ref, ctx, [source_ref], torch_threads)
            for _ in range(num_encoders)
        ]
        encoded = 0
        in_flight: dict[Any, tuple[Unit, int]] = {}
        next_actor = itertools.cycle(range(num_encoders))
        units = iter(source.units())

        def submit(unit: Unit, attempt: int) -> None:
            in_flight[actors[next(next_actor)].encode_unit.remote(unit)] = (unit, attempt)

        with tqdm(desc="encoding (ray)", unit="unit", disable=not progress) as bar:
            for unit in itertools.islice(units, 2 * num_encoders):  # one queued behind each running unit
                submit(unit, 0)
            while in_flight:
                (ready,), _ = ray.wait(list(in_flight), num_returns=1)
                unit, attempt = in_flight.pop(ready)
                try:
                    result: UnitResult = ray.get(ready)
                except ray.exceptions.RayError as err:
                    if attempt >= max_unit_retries:
                        raise RuntimeError(f"unit {unit.name} failed {attempt + 1} times; last error: {err}") from err
                    submit(unit, attempt + 1)
                    continue
                encoded += result.encoded
                bar.update(1)
                following = next(units, None)
                if following is not None:
                    submit(following, 0)
        return encoded
    finally:
        if started:
            ray.shutdown()
