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
        ],
    },
)
