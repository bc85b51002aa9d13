from setuptools import find_packages, setup

setup(
    name="evaclip_paddle",
    version="0.1.0",
    description="EVA-CLIP model zoo for PaddlePaddle: models, training, evaluation, conversion, export",
    packages=find_packages(include=["evaclip_paddle", "evaclip_paddle.*"]),
    package_data={
        "evaclip_paddle": ["model_configs/*.json", "data/*.gz", "eval/metadata/*.json"],
    },
    python_requires=">=3.9",
    install_requires=[
        "numpy",
        "pillow",
        "nltk",
        "visualdl",
        "safetensors",
        "tqdm",
    ],
    entry_points={
        "console_scripts": [
            "evaclip-list=evaclip_paddle.list:main",
            "evaclip-convert=evaclip_paddle.convert.cli:main",
            "evaclip-eval=evaclip_paddle.eval.cli:main",
            "evaclip-export=evaclip_paddle.export.export:main",
            "evaclip-embed=evaclip_paddle.export.embed:main",
            "evaclip-serve=evaclip_paddle.export.serve:main",
            "evaclip-train=evaclip_paddle.train.cli:main",
        ],
    },
)
