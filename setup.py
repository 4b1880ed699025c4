from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [l.strip() for l in f if l.strip() and not l.startswith("#") and not l.startswith("-")]

setup(
    name="llama_caption",
    version="0.1.0",
    description="Image captioning with a frozen CLIP ViT and a frozen model-parallel LLaMA: train only the prefix projection",
    packages=find_packages(include=["llama_caption", "llama_caption.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    # test: the suite; playwright drives Debian's chromium in the server's browser test (it never
    # downloads a browser); openai is the client the server's OpenAI-compatible routes are tested
    # with. bench: transformers, the reference the benchmark and tests compare with.
    extras_require={"bench": ["transformers>=4.40"], "test": ["pytest", "pytest-xdist>=3.5", "playwright>=1.40", "transformers>=4.40", "openai>=1.40"]},
)
