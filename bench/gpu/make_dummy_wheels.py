"""Empty wheels named torch / torchaudio / torchvision at the GPU image's versions, so `pip download vllm`
resolves against them instead of fetching torch and its CUDA wheels (the GPU machine has its own torch).
    python bench/gpu/make_dummy_wheels.py /tmp/dummy 2.11.0 2.11.0 0.26.0"""
import sys
import zipfile
from pathlib import Path


def dummy(out: Path, name: str, version: str) -> Path:
    v = f"{version}+dummy"  # PEP 440: ==2.11.0 matches 2.11.0+dummy
    di = f"{name}-{v}.dist-info"
    whl = out / f"{name}-{v}-py3-none-any.whl"
    files = {f"{di}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {v}\n",
             f"{di}/WHEEL": "Wheel-Version: 1.0\nGenerator: servesim\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{di}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{di}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for k, text in files.items():
            z.writestr(k, text)
    return whl


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, version in zip(("torch", "torchaudio", "torchvision"), sys.argv[2:5]):
        print(dummy(out, name, version))
