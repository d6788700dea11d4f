"""HF transformers assisted generation / prompt lookup, observed with spec_metrics.

Two tiny Llama models are built in code from configs (no download): a random target, and a
draft that is the target plus weight noise, so the draft agrees with the target often but
not always. Each prompt is generated with `assisted` (the draft model) or `prompt_lookup`
(n-gram lookup in the context), inside `instrument(model, hooks)`; the example then checks
that the output equals the target's plain greedy output and prints what the hooks recorded.

    python examples/hf_assisted_generation.py --mode assisted
    python examples/hf_assisted_generation.py --mode prompt_lookup --device cuda
    python examples/hf_assisted_generation.py --serve-for 60    # /metrics on 127.0.0.1:9464
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from opentelemetry.sdk.trace import TracerProvider
from transformers import LlamaConfig, LlamaForCausalLM

import spec_metrics
from spec_metrics.integrations.transformers import instrument


def build_models(device: str, seed: int, noise: float, hidden: int, layers: int,
                 vocab: int) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random target and a draft = target + Gaussian noise (`noise` x each tensor's std).
    Random models share no knowledge, so disagreement is made on purpose: noise 0 accepts
    every draft token, noise >= 0.6 almost none."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    target = LlamaForCausalLM(config).eval()
    draft = LlamaForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator)
                           * noise * parameter.std())
    return target.to(device), draft.to(device)


def configure_draft(draft: LlamaForCausalLM, k: int) -> None:
    # transformers' defaults: 20 tokens, stopping early below 0.4 confidence (a random
    # model is never that confident, so it would draft 1 token). Fix K instead.
    config = draft.generation_config
    config.num_assistant_tokens = k
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("assisted", "prompt_lookup"), default="assisted")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--draft-tokens", type=int, default=4, help="K")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.1, help="draft weight noise")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--serve-for", type=float, default=0.0, metavar="SECONDS",
                        help="serve /metrics while generating and this long after (0: off)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")

    target, draft = build_models(args.device, args.seed, args.noise, args.hidden_size,
                                 args.layers, args.vocab)
    configure_draft(draft, args.draft_tokens)
    method = "draft_model" if args.mode == "assisted" else "ngram"
    steps: list[spec_metrics.StepResult] = []
    hooks = spec_metrics.SpecDecodeHooks(
        method, labels={"model": "tiny-llama", "engine": "transformers"},
        tracer_provider=TracerProvider(), trace_ratio=0.1, max_draft_tokens=args.draft_tokens,
        # On a GPU the hooks only see enqueue times: CUDA events give device time.
        timer="cuda" if args.device == "cuda" else "cpu", on_step=steps.append,
    )
    if args.device == "cuda":
        hooks.warm_up_device(1)
    server = None
    if args.serve_for > 0:
        server = spec_metrics.start_http_server(port=args.port, host=args.host)
        print(f"serving {server.url}")

    rng = np.random.default_rng(args.seed)
    if args.mode == "assisted":
        kwargs = {"assistant_model": draft}
    else:
        kwargs = {"prompt_lookup_num_tokens": args.draft_tokens}
    identical = new_tokens = 0
    elapsed = 0.0
    for _ in range(args.prompts):
        # Prompt lookup needs repetition in the context: the prompt repeats a phrase.
        phrase = rng.integers(1, args.vocab, size=6).tolist()
        prompt = torch.tensor([phrase * 2 + phrase[:2]], device=args.device)
        with torch.no_grad():
            plain = target.generate(prompt, max_new_tokens=args.max_new_tokens,
                                    do_sample=False)
            start = time.perf_counter()
            with instrument(target, hooks):
                out = target.generate(prompt, max_new_tokens=args.max_new_tokens,
                                      do_sample=False, **kwargs)
            elapsed += time.perf_counter() - start
        identical += int(torch.equal(out, plain))
        new_tokens += out.shape[1] - prompt.shape[1]
    hooks.flush()
    print_summary(args, steps, identical, new_tokens, elapsed)
    if server is not None:
        print(f"serving {server.url} for {args.serve_for:g}s more")
        time.sleep(args.serve_for)
        server.close()
    hooks.close()


def print_summary(args: argparse.Namespace, steps: list[spec_metrics.StepResult],
                  identical: int, new_tokens: int, elapsed: float) -> None:
    drafted = sum(s.draft_tokens for s in steps)
    accepted = sum(s.accepted_tokens for s in steps)
    drafts = sum(1 for s in steps if s.draft_tokens > 0)
    emitted = accepted + sum(s.requests for s in steps)
    print(f"mode={args.mode} device={args.device} K={args.draft_tokens} "
          f"prompts={args.prompts} timer={'cuda' if args.device == 'cuda' else 'cpu'}")
    print(f"outputs identical to the target's greedy output: {identical}/{args.prompts}")
    print(f"steps={len(steps)} drafts={drafts} draft_tokens={drafted} accepted={accepted} "
          f"emitted={emitted} (generated {new_tokens})")
    if drafted:
        print(f"acceptance rate={accepted / drafted:.3f} "
              f"mean accepted length={1 + accepted / max(drafts, 1):.2f}")
    print(f"tokens/s={new_tokens / elapsed:.1f} (instrumented generate() calls only)")
    for index, stage in enumerate(("draft", "verify")):
        values = [s.stage_seconds[index] for s in steps if s.stage_seconds[index] is not None]
        if values:
            p50, p99 = np.percentile(np.array(values) * 1e3, [50, 99])
            print(f"{stage}: n={len(values)} p50={p50:.3f} ms p99={p99:.3f} ms")


if __name__ == "__main__":
    main()
