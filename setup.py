from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [l.strip() for l in f if l.strip() and not l.startswith("#") and not l.startswith(("pytest", "playwright"))]

setup(
    name="llama_caption",
    version="0.1.0",
    description="Image captioning with a frozen CLIP ViT and a frozen model-parallel LLaMA: train only the prefix projection",
    packages=find_packages(include=["llama_caption", "llama_caption.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"bench": ["transformers>=4.40"], "test": ["pytest", "playwright"]},
)
