"""The companion lesson: automatic differentiation and backpropagation, the JAX way.

In PyTorch you mark tensors `requires_grad=True`, call `.backward()`, read `.grad`, call
`zero_grad()` before the next step and `optimizer.step()` to update. In JAX, `jax.grad(f)` is a
function that returns gradients; the graph is a jaxpr traced from `f`; nothing accumulates; an
optax optimizer turns gradients into updates. Twelve sections, each printed and tested (code:
experiments/autograd_lesson.py, tests: tests/test_autograd.py). Runs in a few seconds on a CPU.

  python -m experiments.autograd              # every section
  python -m experiments.autograd --section 5  # one section
"""

from experiments import autograd_lesson as lesson
from mnist_jax import flags


def main(argv=None):
    parser = flags.Parser(prog="python -m experiments.autograd", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--section",
        type=int,
        choices=range(1, len(lesson.SECTIONS) + 1),
        metavar=f"1..{len(lesson.SECTIONS)}",
        help="run one section only",
    )
    args = parser.parse_args(argv)
    numbers = [args.section] if args.section else range(1, len(lesson.SECTIONS) + 1)
    for n in numbers:
        section = lesson.SECTIONS[n - 1]()
        print(f"\n{n}. {section.title}")
        for line in section.lines:
            print("   " + line.replace("\n", "\n   "))


if __name__ == "__main__":
    main()
