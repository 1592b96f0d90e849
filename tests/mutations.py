"""
Plant realistic bugs one at a time and check that the test suite catches each (a mutation audit).

    python tests/mutations.py                 # every mutation (~5 minutes on 2 cores)
    python tests/mutations.py rope_blend_swapped kv_cache_positions   # some of them

Each mutation replaces one exact piece of a chapter (it must occur exactly once) in a scratch copy
of the repository, runs only the tests mapped to it, and counts it caught when they fail. Not part
of the default test run: it runs pytest once per mutation. A chapter that adds a behaviour adds its
mutations here, so a test that can no longer fail shows up as "MISSED".
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (file, original text, planted bug, tests that must catch it)
MUTATIONS = {
    "doc_mask_dropped": (
        "03_pretrain.py", "doc_ids=doc_ids[:, :-1] if doc_mask else None)  # (b, T, V)", "doc_ids=None)  # (b, T, V)",
        "tests/test_pretrain.py -k packed_row"),
    "mean_of_micro_batch_means": (
        "03_pretrain.py", 'reduction="sum")\n    return loss, tokens[:, 1:].numel()', 'reduction="mean")\n    return loss, 1',
        "tests/test_pretrain.py -k packed_row"),
    "no_gradient_clipping": (
        "03_pretrain.py", "clip_grad_norm_(model.parameters(), grad_clip)",
        'clip_grad_norm_(model.parameters(), float("inf"))', "tests/test_pretrain.py -k adamw"),
    "embedding_weight_decayed": (
        "03_pretrain.py", 'decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in n]',
        "decay = [p for n, p in model.named_parameters() if p.dim() >= 2]", "tests/test_pretrain.py -k adamw"),
    "resume_keeps_lost_steps_in_the_log": (
        "03_pretrain.py", 'lambda r: r.get("step", 0) <= resume_at', "lambda r: True",
        "tests/test_pretrain.py -k sigkill"),
    "checkpoint_not_fsynced": (
        "01_tokenizer.py", "        os.fsync(f.fileno())\n", "", "tests/test_pretrain.py -k durably"),
    "rope_blend_swapped": (
        "02_model.py", "blended = (1 - smooth) * freqs / args.rope_scale_factor + smooth * freqs",
        "blended = smooth * freqs / args.rope_scale_factor + (1 - smooth) * freqs", "tests/test_model.py -k blend"),
    "rope_rotates_the_wrong_way": (
        "02_model.py", "torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)",
        "torch.stack([x0 * cos + x1 * sin, -x0 * sin + x1 * cos], dim=-1)", "tests/test_model.py -k relative_position"),
    "kv_cache_positions": (
        "02_model.py", "cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, Dh/2)",
        "cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, Dh/2)", "tests/test_model.py -k kv_cache_decode"),
    "gqa_heads_grouped_wrongly": (
        "02_model.py", "return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)",
        "return x if n_rep == 1 else x.repeat(1, n_rep, 1, 1)", "tests/test_model.py -k math_paths"),
    "temperature_ignored": (
        "02_model.py", "probs = F.softmax(logits / temperature, dim=-1)", "probs = F.softmax(logits, dim=-1)",
        "tests/test_model.py -k sampling"),
    "stop_token_only_for_the_first_row": (
        "02_model.py", "finished[row] = finished[row] or token in stop",
        "finished[row] = finished[row] or (token in stop and row == 0)", "tests/test_model.py -k stops"),
    "user_text_becomes_special_tokens": (
        "01_tokenizer.py", 'self.encode(message["content"].strip()) + [self.eot_id]',
        'self.encode(message["content"].strip(), allowed_special="all") + [self.eot_id]',
        "tests/test_tokenizer.py -k inject"),
    "bpe_rightmost_on_ties": (
        "01_tokenizer.py", "if rank is not None and (best_rank is None or rank < best_rank):",
        "if rank is not None and (best_rank is None or rank <= best_rank):", "tests/test_tokenizer.py -k equals_tiktoken"),
    "minhash_threshold_exclusive": (
        "03_pretrain.py", "np.mean(signatures[j] == signatures[k]) >= threshold",
        "np.mean(signatures[j] == signatures[k]) > threshold", "tests/test_curation.py -k threshold"),
    "stage_warmup_starts_at_zero": (
        "04_long_context.py", "lr = self.cfg.lr * min(1.0, (i + 1) / self.cfg.warmup)",
        "lr = self.cfg.lr * min(1.0, i / self.cfg.warmup)", "tests/test_long_context.py -k warms_up"),
    "gate_ignores_the_tolerance": (
        "04_long_context.py", "short <= self.short_before * (1 + self.cfg.recover_tolerance)",
        "short <= self.short_before", "tests/test_long_context.py -k three_percent"),
    "passkey_rows_lose_their_answer": (
        "04_long_context.py", "number, with_answer=True)\n", "number, with_answer=False)\n",
        "tests/test_long_context.py -k _rows_"),
    "contrast_without_the_lever": (
        "04_long_context.py", "set_args(model, extend_rope(base_args, final, base_args.max_seq_len, final, lever))",
        'set_args(model, extend_rope(base_args, final, base_args.max_seq_len, final, "none"))',
        "tests/test_long_context.py -k contrast"),
    "stage_0_rows_hold_one_document_each": (
        "04_long_context.py", "rows, length, fraction, self.rng, passkey_len)", "rows, length, fraction, self.rng)",
        "tests/test_long_context.py -k stage_0"),
    "niah_contrast_with_other_needles": (
        "04_long_context.py", "seed=cfg.seed + len(cfg.stages))", "seed=cfg.seed)",
        "tests/test_long_context.py -k stage_0"),
    "stage_0_resumes_from_its_start": (
        "04_long_context.py", "self.train_steps(n, 0, self.base_len, done, passkey_len=doc_len,",
        "self.train_steps(n, 0, self.base_len, 0, passkey_len=doc_len,", "tests/test_long_context.py -k stage_0"),
    "stage_0_takes_the_stages_share_of_passkey_rows": (
        "04_long_context.py", "passkey_len=doc_len, fraction=cfg.retrieval_fraction)", "passkey_len=doc_len)",
        "tests/test_long_context.py -k stage_0"),
    "stages_gated_against_the_model_before_stage_0": (
        "04_long_context.py", "        self.short_before = short  # what the stages must recover to", "        # ",
        "tests/test_long_context.py -k stage_0"),
    "math_benchmark_not_decontaminated": (
        "05_anneal.py",
        "math_items, dropped_math = contamination_filter(math_benchmark(cfg.math_items), corpus_text, lambda item: item[0])",
        "math_items, dropped_math = math_benchmark(cfg.math_items), 0", "tests/test_anneal.py -k planted"),
    "math_method_ignores_order": (
        "05_anneal.py", "return {\"math_method\": operations(mine) == operations(working),",
        "return {\"math_method\": sorted(operations(mine)) == sorted(operations(working)),",
        "tests/test_anneal.py -k tiers"),
    "probe_ignores_its_runs_batch": (
        "05_anneal.py", "batch_tokens=cfg.batch_tokens or pretraining_batch(ckpt_path) or 4 * seq_len)",
        "batch_tokens=cfg.batch_tokens or 4 * seq_len)", "tests/test_anneal.py -k probe"),
    "last_snapshot_averaged_twice": (
        "05_anneal.py", "    if log_file:\n        log_file.close()\n    return average",
        "    if log_file:\n        log_file.close()\n    average.add(model.state_dict())\n    return average",
        "tests/test_anneal.py -k planted"),
    "sft_mask_off_by_one": (
        "06_reward_model.py", "mask += [0] * len(header) + [learn] * len(message_ids)",
        "mask += [0] * (len(header) + 1) + [learn] * (len(message_ids) - 1)", "tests/test_reward_model.py -k render_masks"),
    "reward_read_from_the_wrong_token": (
        "06_reward_model.py", "        ends.append(len(ids) - 1)", "        ends.append(len(ids) - 2)",
        "tests/test_reward_model.py -k packed_row"),
    "reward_loss_sign_flipped": (
        "06_reward_model.py", "-F.logsigmoid(better_rewards - worse_rewards).sum()",
        "-F.logsigmoid(worse_rewards - better_rewards).sum()", "tests/test_reward_model.py -k reward_loss_by_hand"),
    "responses_see_each_other": (
        "02_model.py", "same_branch = branches[:, :, None] == branches[:, None, :]  # (B, T, T)",
        "same_branch = (branches[:, :, None] >= 0) & (branches[:, None, :] >= 0)  # (B, T, T)",
        "tests/test_reward_model.py -k packed_row"),
    "sft_loss_on_every_token": (
        "07_sft.py", "keep = mask[:, 1:] != 0", "keep = mask[:, 1:] >= 0",
        "tests/test_sft.py -k masked"),
    "sft_mean_of_row_means": (
        "07_sft.py", "return -logps.sum(), (mask[:, 1:] != 0).sum()", "return -logps.sum() / (mask[:, 1:] != 0).sum(), 1",
        "tests/test_sft.py -k packed"),
    "shared_prompt_cache_rows_mixed_up": (
        "02_model.py", "self.k = [t.repeat_interleave(n, dim=0) for t in self.k]",
        "self.k = [t.repeat(n, 1, 1, 1) for t in self.k]", "tests/test_model.py -k share"),
    "rejection_sampling_keeps_unended_samples": (
        "07_sft.py", "if ended and (judges[item[\"family\"]] == \"reward model\"",
        "if (judges[item[\"family\"]] == \"reward model\"", "tests/test_sft.py -k pick"),
    "reward_scoring_overflows_the_context": (
        "06_reward_model.py", "if parts[-1] and prompt + size + length > context:", "if False:",
        "tests/test_reward_model.py -k score_splits"),
    "dpo_margin_sign": (
        "08_dpo.py", "(policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)",
        "(policy_chosen_logps - ref_chosen_logps) + (policy_rejected_logps - ref_rejected_logps)",
        "tests/test_dpo.py -k reference_the_loss"),
    "dpo_formatting_tokens_kept": (
        "08_dpo.py", "return [m * (i not in formatting) for i, m in zip(ids, mask)]", "return list(mask)",
        "tests/test_dpo.py -k words_only"),
    "dpo_nll_summed_over_tokens": (
        "08_dpo.py", "-chosen / counts[:B]", "-chosen", "tests/test_dpo.py -k mean_nll"),
    "dpo_pairs_from_unended_samples": (
        "08_dpo.py", "for (text, done), r in zip(options, scores) if done]", "for (text, done), r in zip(options, scores)]",
        "tests/test_dpo.py -k tells_apart"),
    "ppo_clip_range_lopsided": (
        "08_dpo.py", "ratio.clamp(1 - clip, 1 + clip)", "ratio.clamp(1 - clip, 1 + 2 * clip)", "tests/test_dpo.py -k clipped"),
    "gae_without_bootstrap": (
        "08_dpo.py", "rewards[t] + gamma * next_value - values[t]", "rewards[t] - values[t]", "tests/test_dpo.py -k gae"),
    "ppo_without_kl_penalty": (
        "08_dpo.py", "rewards = -cfg.kl_coef * (old - ref) * keep", "rewards = 0 * (old - ref) * keep",
        "tests/test_dpo.py -k rollouts"),
    "tool_call_ends_its_turn": (
        "01_tokenizer.py", "*self.encode(message[\"content\"].strip()),\n                                                      self.eom_id]",
        "*self.encode(message[\"content\"].strip()),\n                                                      self.eot_id]",
        "tests/test_tools.py -k documented_exchange"),
    "parser_accepts_any_tool_name": (
        "09_tools.py", "return call if call.name in known else", "return call if True else",
        "tests/test_tools.py -k malformed"),
    "json_arguments_cut_at_first_brace": (
        "09_tools.py", "arguments = _json_object(match.group(2))",
        "arguments = _json_object(match.group(2)[:match.group(2).find('}') + 1])",
        "tests/test_tools.py -k documented_form"),
    "sandbox_without_audit_hook": (
        "09_tools.py", "sys.addaudithook(hook)", "None", "tests/test_tools.py -k write_or_delete"),
    "sandbox_hook_reads_its_names_late": (
        "09_tools.py", "         REFUSED=REFUSED, CHANGES=CHANGES, isinstance=isinstance, any=any, str=str, bytes=bytes, int=int,\n"
        "         PermissionError=PermissionError):", "):", "tests/test_tools.py -k hostile"),
    "sandbox_inherits_environment": (
        "09_tools.py", "env={}, stdin", "env=dict(os.environ), stdin", "tests/test_tools.py -k environment"),
    "tool_results_not_cut": (
        "09_tools.py", "def execute(call, tools, max_chars=500):", "def execute(call, tools, max_chars=10**6):",
        "tests/test_tools.py -k stays_bounded"),
    "agent_loop_unbounded": (
        "09_tools.py", "if isinstance(call, NotACall) or calls[i] > max_calls:", "if isinstance(call, NotACall):",
        "tests/test_tools.py -k stays_bounded"),
    "held_out_countries_in_training": (
        "09_tools.py", "countries = [c for c in countries if rwd.is_held_out_prompt(c[\"name\"]) == (split == \"test\")]",
        "countries = list(countries)", "tests/test_tools.py -k held_out"),
    "upsampling_ignored": (
        "05_anneal.py", "w * factors.get(pre.category_of(s), 1.0)", "w", "tests/test_anneal.py -k upsampling"),
    "phase_resumes_without_its_rng": (
        "03_pretrain.py", '        rng.setstate(state.pop("rng"))\n', '        state.pop("rng")\n',
        "tests/test_sft.py -k sigkill"),
    "reward_phase_saves_only_at_the_end": (
        "03_pretrain.py", "(step % self.every == 0 or step == last)", "(step == last)",
        "tests/test_reward_model.py -k sigkill"),
    "ppo_phase_resumes_without_its_log": (
        "08_dpo.py", 'results["steps"] = saved.get("log", results["steps"])', 'saved.get("log")',
        "tests/test_dpo.py -k interrupted"),
    "report_never_out_of_date": (
        "tutorials/report.py", "if p.is_file() and p.stat().st_mtime > metrics.stat().st_mtime]",
        "if False]", "tests/test_report.py -k change"),
    "exercise_check_accepts_halves": (
        "tutorials/exercises/test_exercises.py", "expect_close(got, [[0.0, 1.0, 0.0, -2.0]]",
        "expect_close(rotate_pairs(x, angles) * 0, 0 * rotate_pairs(x, angles)", "tests/test_course.py -k mistake"),
    "extension_starts_from_bytes": (
        "01_tokenizer.py", "vocab = sorted(base, key=base.get) if base else [bytes([b]) for b in range(256)]",
        "vocab = [bytes([b]) for b in range(256)]", "tests/test_tokenizer.py -k extending"),
    "translation_held_out_by_its_own_name": (
        "01_tokenizer.py", 'key = f"bible/{rest}" if source in MULTILINGUAL_SOURCES else name', "key = name",
        "tests/test_tokenizer.py -k aligned"),
    "one_curation_pipeline_for_all_languages": (
        "03_pretrain.py", "    for lang, group in by_language(docs, language).items():\n        group_kept",
        '    for lang, group in {"all": docs}.items():\n        group_kept', "tests/test_curation.py -k own_line"),
    "ukrainian_answers_in_english": (
        "06_reward_model.py", 'return LANGUAGES[language_of(prompt)]["yes" if answer else "no"]',
        'return ENGLISH["yes" if answer else "no"]', "tests/test_reward_model.py -k ukrainian"),
}


def scratch_copy(folder):
    """The repository's files as git sees them (tracked, and untracked but not ignored)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)


def run(names):
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        scratch_copy(scratch)
        tests = sorted({t for name in names for t in MUTATIONS[name][3].split(" -k ")[:1]})
        selection = " or ".join(sorted({MUTATIONS[name][3].split(" -k ")[1] for name in names}))
        baseline = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                                   *tests, "-k", selection], cwd=scratch, capture_output=True, text=True)
        if baseline.returncode != 0:  # a mapped test that fails without any bug would count as "caught"
            print(baseline.stdout[-3000:])
            raise SystemExit("the mapped tests fail on the unmutated code: fix them first")
        for name in names:
            file, original, planted, tests = MUTATIONS[name]
            path = scratch / file
            source = path.read_text()
            if source.count(original) != 1:
                results[name] = f"STALE: the original text occurs {source.count(original)} times in {file}"
                print(f"{name:<40} {results[name]}", flush=True)
                continue
            path.write_text(source.replace(original, planted))
            t0 = time.time()
            test = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   "-m", "not slow", *tests.split()], cwd=scratch, capture_output=True, text=True)
            path.write_text(source)
            # exit status 1: a test failed (caught); 0: all passed (missed); 5: nothing selected (stale map)
            results[name] = {1: "caught", 0: "MISSED"}.get(test.returncode, f"ERROR (pytest exit {test.returncode})")
            print(f"{name:<40} {results[name]:<7} ({time.time() - t0:.0f} s, {tests})", flush=True)
    missed = [n for n, r in results.items() if r != "caught"]
    print(f"\n{len(results) - len(missed)} of {len(results)} planted bugs caught" + (f"; not: {', '.join(missed)}" if missed else ""))
    return not missed


if __name__ == "__main__":
    sys.exit(0 if run(sys.argv[1:] or list(MUTATIONS)) else 1)
