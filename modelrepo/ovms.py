"""The OpenVINO Model Server view of the repository: config.json and each model's graph.pbtxt."""

from __future__ import annotations

import json
from pathlib import Path

from modelrepo.index import Index, write_atomic
from modelrepo.numerics import Numerics

CONFIG = "config.json"
GRAPH = "graph.pbtxt"

# What OVMS's export_model.py writes for text generation: a continuous-batching LLM graph whose
# models_path is the version folder itself.
_GRAPH_TEMPLATE = """input_stream: "HTTP_REQUEST_PAYLOAD:input"
output_stream: "HTTP_RESPONSE_PAYLOAD:output"

node: {{
  name: "LLMExecutor"
  calculator: "HttpLLMCalculator"
  input_stream: "LOOPBACK:loopback"
  input_stream: "HTTP_REQUEST_PAYLOAD:input"
  input_side_packet: "LLM_NODE_RESOURCES:llm"
  output_stream: "LOOPBACK:loopback"
  output_stream: "HTTP_RESPONSE_PAYLOAD:output"
  input_stream_info: {{
    tag_index: 'LOOPBACK:0',
    back_edge: true
  }}
  node_options: {{
      [type.googleapis.com / mediapipe.LLMCalculatorOptions]: {{
          models_path: "./",
          plugin_config: '{plugin_config}',
          enable_prefix_caching: false,
          cache_size: 10,
          max_num_seqs: 256,
          device: "{device}",
      }}
  }}
  input_stream_handler {{
    input_stream_handler: "SyncSetInputStreamHandler",
    options {{
      [mediapipe.SyncSetInputStreamHandlerOptions.ext] {{
        sync_set {{
          tag_index: "LOOPBACK:0"
        }}
      }}
    }}
  }}
}}
"""


def graph_text(device: str, numerics: Numerics | None = None) -> str:
    """graph.pbtxt; its plugin_config carries the version's pinned numerics, so OVMS computes as validated."""
    config = json.dumps(numerics.plugin_config() if numerics else {})
    return _GRAPH_TEMPLATE.format(device=device, plugin_config=config)


def write_graph(folder: Path, device: str, numerics: Numerics | None = None) -> None:
    (folder / GRAPH).write_text(graph_text(device, numerics), encoding="utf-8")


def config_text(index: Index) -> str:
    """config.json lists the live merged and base models; OVMS has no runtime adapters to list."""
    models = [
        {"config": {"name": e.name, "base_path": e.path}}
        for e in sorted(index.entries.values(), key=lambda e: e.name)
        if e.kind != "adapter"
    ]
    return json.dumps({"model_config_list": models}, indent=2) + "\n"


def write_config(repository: Path, index: Index) -> None:
    write_atomic(repository / CONFIG, config_text(index))
