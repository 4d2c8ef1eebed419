"""The engine server as a script file, for msrun (which runs `python SCRIPT`, not `python -m`):

    scripts/msrun_launcher.sh "scripts/engine_server.py --model DIR --address unix:/tmp/e.sock \
        --parallel-config {model_parallel:2}" 2

`deepseek-ms serve` starts it this way when the serve YAML sets use_parallel: True.
"""
import os
import sys

# the package itself, also when it is not installed into the environment
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepseek_ms.serving.engine_server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
