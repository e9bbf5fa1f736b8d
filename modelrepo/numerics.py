"""How a version is computed: the runtime settings that change its tokens, pinned at build, applied by every server.

OpenVINO's CPU plugin picks its compute precision from the CPU: where `OPTIMIZATION_CAPABILITIES`
lists BF16 (AVX-512 bf16, AMX) it computes in bf16 by default, even for an fp16 IR, elsewhere in
f32; the KV cache is u8 by default everywhere; int8/int4 weights meet activations quantized
dynamically in groups of 32. A version validated on one CPU and served on another would then be
computed differently from what the gate passed. So these settings belong to the version: chosen at
build (`auto` resolves to concrete values), validated with exactly them, written to the manifest
and to graph.pbtxt's plugin_config (OVMS), and passed to the engine by every server.

The defaults (`DEFAULT`) and why: README, "Numerics". The process-wide default for `auto`'s compute
precision can be changed with LORA_INFERENCE_PRECISION (the test suite's switch between f32 and bf16).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from modelrepo.errors import RepositoryError

INFERENCE_PRECISIONS: tuple[str, ...] = ("f32", "bf16", "f16")
KV_CACHE_PRECISIONS: tuple[str, ...] = ("u8", "f16", "bf16", "f32")
PRECISION_ENV = "LORA_INFERENCE_PRECISION"
# The KV caches the CPU plugin's paged attention (the serving engine's) has kernels for, by the precision it
# computes in (measured with OpenVINO 2026.4 on a BF16 CPU; f16 as its source has it for CPUs that compute
# f16). Any other pair fails when the engine compiles: "expect kvcache type bf16, current: f32".
KV_CACHES_FOR_COMPUTE: dict[str, tuple[str, ...]] = {
    "f32": ("u8", "f16", "f32"),
    "bf16": ("u8", "f16", "bf16"),
    "f16": ("u8", "f16"),
}


@dataclass(frozen=True)
class Numerics:
    inference_precision: str  # INFERENCE_PRECISION_HINT: the element type the CPU computes in
    kv_cache_precision: str  # KV_CACHE_PRECISION: the element type of the paged KV cache
    dynamic_quantization_group_size: int  # DYNAMIC_QUANTIZATION_GROUP_SIZE: 0 turns it off

    def check(self) -> Numerics:
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise RepositoryError(
                f"inference_precision must be one of {INFERENCE_PRECISIONS}, got {self.inference_precision!r}"
            )
        if self.kv_cache_precision not in KV_CACHE_PRECISIONS:
            raise RepositoryError(
                f"kv_cache_precision must be one of {KV_CACHE_PRECISIONS}, got {self.kv_cache_precision!r}"
            )
        allowed = KV_CACHES_FOR_COMPUTE[self.inference_precision]
        if self.kv_cache_precision not in allowed:
            raise RepositoryError(
                f"kv_cache_precision {self.kv_cache_precision} cannot go with {self.inference_precision} compute: "
                f"OpenVINO's paged attention, which serves the version, has no kernel for that pair; "
                f"with {self.inference_precision} compute pin one of {allowed}"
            )
        group = self.dynamic_quantization_group_size
        if not isinstance(group, int) or isinstance(group, bool) or group < 0:
            raise RepositoryError(f"dynamic_quantization_group_size must be an integer >= 0, got {group!r}")
        return self

    def plugin_config(self) -> dict[str, str]:
        """OpenVINO properties, as strings: what genai's pipelines, compile_model and OVMS's plugin_config take."""
        return {
            "INFERENCE_PRECISION_HINT": self.inference_precision,
            "KV_CACHE_PRECISION": self.kv_cache_precision,
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": str(self.dynamic_quantization_group_size),
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: Any) -> Numerics:
        if not isinstance(body, dict):
            raise RepositoryError(f"numerics must be an object, got {body!r}")
        try:
            return cls(
                inference_precision=body["inference_precision"],
                kv_cache_precision=body["kv_cache_precision"],
                dynamic_quantization_group_size=body["dynamic_quantization_group_size"],
            ).check()
        except KeyError as e:
            raise RepositoryError(f"numerics has no {e.args[0]!r}") from None

    def __str__(self) -> str:
        return (
            f"{self.inference_precision} compute, {self.kv_cache_precision} KV cache, "
            f"dynamic quantization group {self.dynamic_quantization_group_size or 'off'}"
        )


# f32 compute: the same tokens on every x86 CPU, and on bf16 CPUs faster than bf16 for 1-4 streams
# (bf16 wins from about 16 streams: README, "Numerics"). u8 KV cache and group-32 dynamic
# quantization: OpenVINO's own defaults, which keep the validated agreement (measured there too).
DEFAULT = Numerics(inference_precision="f32", kv_cache_precision="u8", dynamic_quantization_group_size=32)


def default_numerics() -> Numerics:
    """DEFAULT, with the compute precision of LORA_INFERENCE_PRECISION when it is set."""
    precision = os.environ.get(PRECISION_ENV, "").strip()
    return replace(DEFAULT, inference_precision=precision).check() if precision else DEFAULT


def resolve(
    inference_precision: str = "auto", kv_cache_precision: str = "auto", dynamic_quantization_group_size: str = "auto"
) -> Numerics:
    """Concrete numerics from build options, each a value or `auto` (the default's)."""
    default = default_numerics()
    group = dynamic_quantization_group_size
    if group != "auto" and not str(group).isdigit():
        raise RepositoryError(f"dynamic_quantization_group_size must be 'auto' or an integer >= 0, got {group!r}")
    return Numerics(
        inference_precision=default.inference_precision if inference_precision == "auto" else inference_precision,
        kv_cache_precision=default.kv_cache_precision if kv_cache_precision == "auto" else kv_cache_precision,
        dynamic_quantization_group_size=(
            default.dynamic_quantization_group_size if group == "auto" else int(group)
        ),
    ).check()


def pinned(manifest: dict[str, Any]) -> Numerics | None:
    """The numerics a manifest pins; None for a version built before versions pinned them."""
    body = manifest.get("numerics")
    return None if body is None else Numerics.from_json(body)


def effective(numerics: Numerics, device: str = "CPU") -> Numerics:
    """What `device` really computes when asked for `numerics` (a CPU without bf16 computes f32).

    The one function here that needs OpenVINO, imported when called, so the contract's readers stay
    free of ML imports. The plugin reads the hints back as it will apply them.
    """
    import openvino as ov

    core = ov.Core()
    core.set_property(device, numerics.plugin_config())
    names = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16"}
    kv = {"u8": "u8", "uint8_t": "u8", **names}

    def read(key: str, table: dict[str, str]) -> str:
        value = core.get_property(device, key)
        text = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
        return table.get(text, text)

    compute, cache = read("INFERENCE_PRECISION_HINT", names), read("KV_CACHE_PRECISION", kv)
    if cache not in KV_CACHES_FOR_COMPUTE.get(compute, (cache,)):
        # A bf16 cache pinned with bf16 compute, on a CPU that computes f32: the f32 kernels take no bf16
        # cache, and f32 holds every bf16 value exactly.
        cache = "f32"
    return Numerics(
        inference_precision=compute,
        kv_cache_precision=cache,
        dynamic_quantization_group_size=int(core.get_property(device, "DYNAMIC_QUANTIZATION_GROUP_SIZE")),
    )


def engine_properties(numerics: Numerics, device: str = "CPU") -> dict[str, str]:
    """The properties to pass an OpenVINO pipeline for `numerics`: those the device would not apply by itself.

    Why not all of them: openvino-genai 2026.4 given KV_CACHE_PRECISION explicitly, even its own
    default u8, crashed (SIGSEGV) a continuous-batching pipeline with runtime adapters in 3 of 6
    test runs here, never without it. A setting equal to the device's default changes nothing, and
    `effective` reads back what the device applies either way.
    """
    import openvino as ov

    defaults = ov.Core()
    wanted = numerics.plugin_config()
    with_all = ov.Core()
    with_all.set_property(device, wanted)
    changed = {k for k in wanted if str(defaults.get_property(device, k)) != str(with_all.get_property(device, k))}
    return {k: v for k, v in wanted.items() if k in changed}


def capabilities(device: str = "CPU") -> list[str]:
    """The device's OPTIMIZATION_CAPABILITIES (BF16 among them where it computes bf16)."""
    import openvino as ov

    return list(ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES"))
