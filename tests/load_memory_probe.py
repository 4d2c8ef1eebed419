"""Run as a script by test_load_memory: loads an HF folder and prints peak RSS growth
during loading relative to the loaded model's size (its parameters as loaded: a BF16
checkpoint's routed experts stay bf16 under the native kernels), as JSON."""
import json
import sys


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(folder):
    import mindspore  # noqa: F401  (imported before the baseline so its own memory is excluded)
    from deepseek_ms.api import CausalLM
    from deepseek_ms.checkpoint.hf_loader import load_hf_weights
    from deepseek_ms.config import DeepseekConfig

    config = DeepseekConfig.from_pretrained(folder)
    baseline = _status("VmRSS")
    model = CausalLM(config, 256)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM so the peak below is the loading peak
    load_hf_weights(model.net, folder, progress=False)
    peak = _status("VmHWM")
    size = sum(int(p.size) * p.itemsize for _, p in model.net.parameters_and_names())
    print(json.dumps({"model_bytes": size, "peak_growth": peak - baseline}))


if __name__ == "__main__":
    main(sys.argv[1])
