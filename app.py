"""The web app over a t2v pipeline (Gradio, an optional extra: pip install ".[app]").

    python app.py
    python app.py --model runs/x/pipeline --host 0.0.0.0 --port 8000

The page and its options: `t2v/app.py`.
"""

import sys

from t2v.app import main

if __name__ == "__main__":
    sys.exit(main(prog="app.py"))
