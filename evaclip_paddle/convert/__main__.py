"""`python -m evaclip_paddle.convert SRC OUT ...`"""
import sys

from .cli import main

sys.exit(main())
