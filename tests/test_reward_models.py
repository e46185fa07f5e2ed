"""Each reward-model plugin on a tiny random model of its kind: scores match a hand-run forward
pass, do not depend on batching, and errors name the model."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from profuser_plugins.reward_models._common import chat_ids
from profuser_plugins.reward_models.judge import JudgeRM
from profuser_plugins.reward_models.remote_code import RemoteCodeRM
from profuser_plugins.reward_models.sequence_classifier import SequenceClassifierRM
from profuser_plugins.reward_models.starling import StarlingRM
from pydantic import ValidationError

from profuser.components import Judged
from profuser.errors import ModelError
from profuser.pipeline import Runtime
from profuser.plugins import Engine
from profuser.testing import tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ITEMS = [
    Judged("", "What is the capital of France?", "The capital of France is Paris."),
    Judged("You are a helpful assistant.", "Write a short poem about the sea.", "The sea, the wind and the stars."),
    Judged("", "What is 2 + 2?", "5"),
    Judged("", "Summarise the following paragraph in one sentence.", "Large language models predict the next token."),
    Judged("", "Hello!", "Hi"),
]


def runtime():
    return Runtime(device="cpu", progress=False)


def build(cls, params):
    rm = cls(params)
    rm.runtime = runtime()
    return rm


def tiny_llama_config(tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)


# --- sequence_classifier ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seq_cls_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    tok = tiny_tokenizer("llama")
    torch.manual_seed(0)
    # no pad id in the config (as in many RMs): the plugin must still read each sequence's last token
    model = LlamaForSequenceClassification(tiny_llama_config(tok, num_labels=1, pad_token_id=None))
    out = tmp_path_factory.mktemp("rm") / "tiny-seq-cls"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_sequence_classifier_matches_unpadded_forward(seq_cls_dir):
    from transformers import AutoModelForSequenceClassification

    rm = build(SequenceClassifierRM, {"model": str(seq_cls_dir), "batch_size": 3})
    scores = rm.score(ITEMS)
    model = AutoModelForSequenceClassification.from_pretrained(seq_cls_dir).eval()
    tok = rm._load()[1]
    for item, score in zip(ITEMS, scores):
        ids, _ = chat_ids(tok, item, 2048)
        text = tok.decode(ids)
        assert text.startswith(("<|im_start|>user\n", "<|im_start|>system\n"))
        assert text.endswith(f"{item.response}<|im_end|>\n")  # the assistant turn is closed
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == len(scores)
    one_by_one = build(SequenceClassifierRM, {"model": str(seq_cls_dir), "batch_size": 1}).score(ITEMS)
    assert scores == pytest.approx(one_by_one, abs=1e-5)


def test_sequence_classifier_bad_label_names_the_model(seq_cls_dir):
    rm = build(SequenceClassifierRM, {"model": str(seq_cls_dir), "label_index": 3})
    with pytest.raises(ModelError) as err:
        rm.score(ITEMS[:1])
    assert "label_index 3" in err.value.message and str(seq_cls_dir) in err.value.where


# --- starling (value head, safetensors) ---------------------------------------------------------


def _starling_checkpoint(root, prefixes, *, with_config=True, seed=1):
    from safetensors.torch import save_file
    from transformers import LlamaModel

    tok = tiny_tokenizer("llama")
    config = tiny_llama_config(tok)
    torch.manual_seed(seed)
    backbone = LlamaModel(config).eval()
    v_head = torch.randn(1, config.hidden_size)
    tensors = {"v_head.weight": v_head, "model.lm_head.weight": torch.randn(len(tok), config.hidden_size)}
    for prefix in prefixes:  # the authors' wrapper saves the backbone under two names
        tensors.update({prefix + k: v.clone().contiguous() for k, v in backbone.state_dict().items()})
    root.mkdir(parents=True)
    save_file(tensors, str(root / "model.safetensors"))
    if with_config:
        config.save_pretrained(root)
        tok.save_pretrained(root)
    return backbone, v_head, tok


@pytest.mark.parametrize("prefixes", [("transformer.", "model.model."), ("model.model.",)])
def test_starling_value_head_at_last_token(tmp_path, prefixes):
    backbone, v_head, _ = _starling_checkpoint(tmp_path / "starling", prefixes)
    rm = build(StarlingRM, {"model": str(tmp_path / "starling"), "batch_size": 2})
    scores = rm.score(ITEMS)
    _, rm_tok = rm._load()
    for item, score in zip(ITEMS, scores):
        prompt = f"{item.system}\n\n{item.instruction}" if item.system else item.instruction
        text = f"<s>[INST] {prompt} </s> [/INST] {item.response}</s>"
        ids = torch.tensor([rm_tok(text)["input_ids"]])
        with torch.no_grad():
            expected = (backbone(input_ids=ids).last_hidden_state[0, -1] @ v_head[0]).item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert build(StarlingRM, {"model": str(tmp_path / "starling"), "batch_size": 5}).score(ITEMS) == pytest.approx(scores, abs=1e-5)


def test_starling_refuses_a_bin_that_is_not_tensors(tmp_path):
    ckpt = tmp_path / "starling-bin"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    rm = build(StarlingRM, {"model": str(ckpt), "backbone": str(ckpt)})
    with pytest.raises(ModelError, match=r"cannot read pytorch_model.bin as tensors only") as err:
        rm._load()
    assert "starling" in err.value.where


def test_starling_takes_config_and_tokenizer_from_the_backbone(tmp_path):
    backbone_dir = tmp_path / "backbone"
    _, _, tok = _starling_checkpoint(tmp_path / "weights", ("transformer.",), with_config=False)
    tiny_llama_config(tok).save_pretrained(backbone_dir)
    tok.save_pretrained(backbone_dir)
    rm = build(StarlingRM, {"model": str(tmp_path / "weights"), "backbone": str(backbone_dir)})
    assert len(rm.score(ITEMS[:2])) == 2


# --- remote_code ----------------------------------------------------------------------------------

MODELING = textwrap.dedent('''
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaModel, PreTrainedModel


    class TinyRewardModel(PreTrainedModel):
        """Eurus-RM-7b's layout: a backbone, a regression head, the reward at the last real token."""

        config_class = LlamaConfig
        base_model_prefix = "model"

        def __init__(self, config):
            super().__init__(config)
            self.model = LlamaModel(config)
            self.regression_head = nn.Linear(config.hidden_size, 1, bias=False)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            hidden = self.model(input_ids, attention_mask=attention_mask)[0]
            rewards = self.regression_head(hidden).squeeze(-1)
            ends = attention_mask.cumsum(dim=1).argmax(dim=1).view(-1, 1)
            return torch.gather(rewards, 1, ends)
''')


@pytest.fixture(scope="module")
def remote_code_dir(tmp_path_factory):
    import importlib.util

    out = tmp_path_factory.mktemp("rm") / "tiny-remote-rm"
    out.mkdir()
    (out / "modeling_tiny_rm.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location("modeling_tiny_rm_test", out / "modeling_tiny_rm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = tiny_tokenizer("llama")
    config = tiny_llama_config(tok)
    config.auto_map = {"AutoModel": "modeling_tiny_rm.TinyRewardModel"}
    torch.manual_seed(2)
    model = module.TinyRewardModel(config)
    with torch.no_grad():
        model.regression_head.weight.normal_()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model.eval()


def test_remote_code_needs_opt_in():
    with pytest.raises(ValidationError, match="openbmb/Eurus-RM-7b runs Python code from its repository"):
        RemoteCodeRM({"model": "openbmb/Eurus-RM-7b"})


def test_remote_code_eurus_layout(remote_code_dir):
    path, reference = remote_code_dir
    template = "[INST] {instruction} [/INST] {response}"
    rm = build(RemoteCodeRM, {"model": str(path), "trust_remote_code": True, "template": template, "batch_size": 2})
    scores = rm.score(ITEMS)
    _, tok = rm._load()
    for item, score in zip(ITEMS, scores):
        prompt = f"{item.system}\n\n{item.instruction}" if item.system else item.instruction
        ids = torch.tensor([tok(f"[INST] {prompt} [/INST] {item.response}")["input_ids"]])
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=torch.ones_like(ids))[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == len(scores)


# --- judge ----------------------------------------------------------------------------------------


def test_judge_log_odds_of_yes(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    rubric = "Q: {instruction}\nA: {response}\nIs the answer right? Reply yes or no."
    rm = build(JudgeRM, {"model": str(tiny_llama_dir), "rubric": rubric, "batch_size": 2})
    scores = rm.score(ITEMS)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    _, tok, yes, no = rm._load()
    assert yes and no and not set(yes) & set(no)
    for item, score in zip(ITEMS, scores):
        ids = rm.prompt_ids(tok, item)
        assert tok.decode(ids).endswith("Reply yes or no.<|im_end|>\n<|im_start|>assistant\n")
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        expected = (torch.logsumexp(logp[yes], 0) - torch.logsumexp(logp[no], 0)).item()
        assert score == pytest.approx(expected, abs=1e-4)
    assert build(JudgeRM, {"model": str(tiny_llama_dir), "rubric": rubric, "batch_size": 5}).score(ITEMS) == \
        pytest.approx(scores, abs=1e-4)
    other = build(JudgeRM, {"model": str(tiny_llama_dir), "batch_size": 5}).score(ITEMS)
    assert other != pytest.approx(scores, abs=1e-6)  # another rubric, another judgement


def test_judge_keeps_the_rubric_when_cutting(tiny_llama_dir):
    _, tok, _, _ = build(JudgeRM, {"model": str(tiny_llama_dir)})._load()
    bare = len(build(JudgeRM, {"model": str(tiny_llama_dir)}).prompt_ids(tok, Judged("", "Say something.", "")))
    rm = build(JudgeRM, {"model": str(tiny_llama_dir), "max_length": bare + 20})
    ids = rm.prompt_ids(tok, Judged("", "Say something.", "word " * 200))
    assert bare + 10 < len(ids) <= bare + 20  # most of the room is used
    assert "word word" in tok.decode(ids) and "…" in tok.decode(ids)
    assert tok.decode(ids).endswith("Reply yes or no.<|im_end|>\n<|im_start|>assistant\n")


def test_judge_rubric_needs_placeholders():
    with pytest.raises(ValidationError, match=r"must contain \{response\}"):
        JudgeRM({"rubric": "Is {instruction} answered? yes or no"})


def test_all_registered():
    names = Engine(entrypoints=False).registry.names("reward_models")
    assert {"sequence_classifier", "starling", "remote_code", "judge"} <= set(names)


# --- the score stage ------------------------------------------------------------------------------


def test_score_stage_scores_every_source(tmp_path, tiny_llama_dir, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from profuser.components import Record
    from profuser.data import write_records
    from profuser.pipeline import Stage, StageContext
    from profuser.plugins import get_engine
    from profuser.stages import score as score_stage

    monkeypatch.setattr(score_stage, "SHARD_SIZE", 3)  # 10 items: shards of 3, 3, 3, 1
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.parquet", [Record(f"e{i}", it.system, it.instruction, "gt") for i, it in enumerate(ITEMS)])
    inputs = {"data": data}
    answers = {"a": [it.response for it in ITEMS], "b": ["I do not know."] * len(ITEMS)}
    for source, responses in answers.items():
        gen = tmp_path / f"gen-{source}"
        gen.mkdir()
        # in another order than the data: the stage matches by id
        pq.write_table(pa.table({"id": [f"e{i}" for i in reversed(range(len(ITEMS)))], "response": responses[::-1]}),
                       gen / "generations.parquet")
        inputs[f"generate/{source}"] = gen
    rubric = "Q: {instruction}\nA: {response}\nIs the answer right? Reply yes or no."
    config = {"reward_model": {"name": "judge", "params": {"model": str(tiny_llama_dir), "rubric": rubric}},
              "sources": ["a", "b"]}
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage=Stage("score/judge", "score", config, {"data": "data"}), inputs=inputs, out=out,
                       runtime=runtime(), engine=get_engine())
    metrics = score_stage.run(ctx)
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == ["id", "source", "score"]
    assert table["source"].to_pylist() == ["a"] * 5 + ["b"] * 5
    assert table["id"].to_pylist() == [f"e{i}" for i in range(5)] * 2
    judge = build(JudgeRM, {"model": str(tiny_llama_dir), "rubric": rubric})
    expected = judge.score(ITEMS) + judge.score([Judged(it.system, it.instruction, "I do not know.") for it in ITEMS])
    assert table["score"].to_pylist() == pytest.approx(expected, abs=1e-4)
    assert metrics["items"] == 10 and set(metrics["mean_score"]) == {"a", "b"}
    assert sum(metrics["vote_share"].values()) == pytest.approx(1.0)
    assert not (out / "shards").exists()


def test_score_stage_names_a_source_without_generations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from profuser.components import Record
    from profuser.data import write_records
    from profuser.errors import ProfuserError
    from profuser.pipeline import Stage, StageContext
    from profuser.plugins import get_engine
    from profuser.stages import score as score_stage

    data, gen = tmp_path / "data", tmp_path / "gen"
    data.mkdir()
    gen.mkdir()
    write_records(data / "train.parquet", [Record("e0", "", "q", "gt"), Record("e1", "", "q2", "gt")])
    pq.write_table(pa.table({"id": ["e0"], "response": ["r"]}), gen / "generations.parquet")
    config = {"reward_model": {"name": "judge", "params": {}}, "sources": ["mpt"]}
    ctx = StageContext(stage=Stage("score/judge", "score", config), inputs={"data": data, "generate/mpt": gen},
                       out=tmp_path, runtime=runtime(), engine=get_engine())
    with pytest.raises(ProfuserError, match="no generation for 1 example") as err:
        score_stage.run(ctx)
    assert "source mpt" in err.value.where
