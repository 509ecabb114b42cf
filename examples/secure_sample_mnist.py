"""Three local parties securely sample one MNIST digit per class from a DP-trained model.

    python examples/secure_sample_mnist.py                 # the model embedded in the package
    python examples/secure_sample_mnist.py --model runs/dpdm-mnist/checkpoint-300

P0 holds the weights, P1 is the user (noise seed and labels, receives the images), P2 helps;
nobody else sees weights, noise, labels or images. Prints where the PNG and the cost report are
and the fidelity against plaintext sampling with the same noise.
"""

import argparse

from cipherdm_torch.pipelines.job import SampleSpec, embedded_model_dir, run_job, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=embedded_model_dir())
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="secure-samples")
    args = ap.parse_args()
    spec = SampleSpec(model=args.model, sampler="euler", steps=args.steps, labels=list(range(10)),
                      seed=1234)
    print(summary(run_job(spec, args.out, check=True)))


if __name__ == "__main__":  # the parties are spawned processes that import this file
    main()
