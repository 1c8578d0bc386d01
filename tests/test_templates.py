"""Tests for ift_jax.data.templates: YAML loading, sandboxed rendering, error messages."""

import re
import textwrap

import pytest

from ift_jax.data import templates
from ift_jax.data.templates import Template
from ift_jax.errors import UserError

REVIEW = {"text": "Great sound.", "sentiment": 3.1, "rating": 5}


def _write(tmp_path, text, name="t.yaml"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text), encoding="utf-8")
  return path


def test_builtin_catalog_golden():
  catalog = templates.load_templates("")
  assert catalog == templates.load_templates("catalog")
  assert {s: sorted(g) for s, g in catalog.items()} == {
      "amazon_reviews": ["rating_from_review", "review_from_rating", "stars_question"],
      "rotten_tomatoes": ["sentiment"], "imdb": ["sentiment"], "boolq": ["answer_question"],
      "xsum": ["summarize"]}
  rating = catalog["amazon_reviews"]["rating_from_review"]
  assert rating.render(REVIEW) == (
      "Predict the associated rating from the following review:\nGreat sound.\nRating (1-5):", " 5")
  assert rating.answer_choices == (" 1", " 2", " 3", " 4", " 5") and rating.metrics == (
      "exact_match", "rank_accuracy", "mae", "confusion")
  assert rating.stop == ("\n",) and catalog["xsum"]["summarize"].task_metrics == ("rouge",)
  assert catalog["boolq"]["answer_question"].render(
      {"question": "is it?", "passage": "It is.", "answer": "yes"}) == (
          "It is.\nQuestion: is it?\nAnswer yes or no:", " yes")
  assert rating.prompt_fields == {"text"}
  assert catalog["amazon_reviews"]["review_from_rating"].render(REVIEW) == (
      "Write a one-sentence product review with a rating of 5 out of 5:\n", "Great sound.")
  movie = {"text": "fun .", "label": 1, "sentiment": "positive"}
  for source in ("rotten_tomatoes", "imdb"):
    sentiment = catalog[source]["sentiment"]
    assert sentiment.render(movie) == (
        "Classify this movie review as positive or negative.\nReview: fun .\nSentiment:", " positive")
    assert sentiment.answer_choices == (" negative", " positive")


def test_grouped_and_flat_files(tmp_path):
  grouped = _write(tmp_path, """\
      "*":
        echo: {prompt: "Say {{ text }}", completion: " {{ text }}"}
      mine:
        echo: {prompt: "Repeat: {{ text }}", completion: " {{ text }}"}
        qa:
          prompt: |
            Q: {{ question }}
          completion: "{{ answer }}"
          metrics: [exact_match]
      """)
  loaded = templates.load_templates(str(grouped))
  assert loaded["mine"]["qa"].prompt == "Q: {{ question }}\n"
  assert loaded["mine"]["qa"].metrics == ("exact_match",) and loaded["mine"]["qa"].answer_choices is None
  assert loaded["mine"]["qa"].origin == str(grouped)
  chosen = templates.templates_for(loaded, "mine")
  assert sorted(chosen) == ["echo", "qa"] and chosen["echo"].prompt.startswith("Repeat")  # own group wins
  assert sorted(templates.templates_for(loaded, "other")) == ["echo"]
  flat = _write(tmp_path, 'echo: {prompt: "Say {{ text }}", completion: " {{ text }}"}\n', "flat.yaml")
  assert sorted(templates.load_templates(str(flat))) == ["*"]


def test_templates_for_unknown_source(tmp_path):
  path = _write(tmp_path, 'a:\n  t: {prompt: "x", completion: "y"}\n')
  with pytest.raises(UserError, match=r"no templates for data source 'b' in .*t.yaml.*add a group 'b'"):
    templates.templates_for(templates.load_templates(str(path)), "b")


def test_sandbox_blocks_dunder_access():
  evil = Template(name="evil", prompt="{{ ''.__class__.__mro__ }}", completion="x", origin="evil.yaml")
  with pytest.raises(UserError, match=r"template 'evil' \(evil.yaml\): blocked by the sandbox"):
    evil.render({})
  mutate = Template(name="mutate", prompt="{{ items.append(1) }}", completion="x")
  record = {"items": [0]}
  with pytest.raises(UserError, match="blocked by the sandbox"):
    mutate.render(record)
  assert record == {"items": [0]}


def test_missing_field_names_field_and_record_fields():
  template = Template(name="t", prompt="{{ txt }}", completion=" {{ rating }}", origin="f.yaml")
  with pytest.raises(UserError) as err:
    template.render(REVIEW)
  assert str(err.value) == ("template 't' (f.yaml) uses field 'txt' but the record has fields "
                            "['rating', 'sentiment', 'text']; fix the template or the data")


def test_render_errors_become_user_errors():
  template = Template(name="t", prompt="{{ text + 1 }}", completion="x")
  with pytest.raises(UserError, match="rendering failed .*TypeError"):
    template.render(REVIEW)
  template = Template(name="t", prompt="{{ text.nope }}", completion="x")
  with pytest.raises(UserError, match="has no attribute 'nope'"):
    template.render(REVIEW)


def test_overrides_replace_fields_and_whitespace_is_kept():
  template = Template(name="t", prompt="A {{ text }}\n", completion="{{ text }}\n")
  assert template.render(REVIEW, overrides={"text": "Gre"}) == ("A Gre\n", "Gre\n")
  assert REVIEW["text"] == "Great sound."


def test_prompt_fields_ignore_locals_and_globals():
  template = Template(name="t", prompt="{% for w in words %}{{ w }}{% endfor %}{{ range(2) | list }}{{ a.b }}",
                      completion="{{ c }}")
  assert template.prompt_fields == {"words", "a"}
  assert template.fields == {"words", "a", "c"}


def test_jinja_syntax_error_names_file_line_and_template(tmp_path):
  path = _write(tmp_path, """\
      src:
        fine: {prompt: "ok", completion: "ok"}
        broken:
          prompt: |
            line one
            {{ text }
          completion: "x"
      """)
  with pytest.raises(UserError) as err:
    templates.load_templates(str(path))
  assert str(err.value).startswith(f"{path}:6: template src/broken prompt: Jinja syntax error:")


def test_yaml_syntax_error_names_line(tmp_path):
  path = _write(tmp_path, 'a:\n  t: {prompt: "x", completion: "y"\nb: 1\n')
  with pytest.raises(UserError, match=rf"^{path}:\d+: YAML syntax error"):
    templates.load_templates(str(path))


@pytest.mark.parametrize("body,message", [
    ('t: {prompt: "x"}\n', r":1: template \*/t: 'completion' must be a string"),
    ('s:\n  t: {prompt: "x", completion: "y", choices: [a]}\n', r":2: template s/t: unknown key 'choices'"),
    ('s:\n  t: {prompt: "x", completion: "y", answer_choices: []}\n', "'answer_choices' must be a non-empty"),
    ("s: 3\n", r":1: 's' must be a template"),
    ("- a\n", "expected a mapping of templates"),
    ('s:\n  t: {prompt: "x", completion: "y"}\n  t: {prompt: "x", completion: "z"}\n',
     r":3: duplicate key 't'"),
])
def test_malformed_entries(tmp_path, body, message):
  path = _write(tmp_path, body)
  with pytest.raises(UserError, match=message):
    templates.load_templates(str(path))


def test_missing_template_file_lists_builtins(tmp_path):
  with pytest.raises(UserError, match=r"template file .* not found.*\(catalog\)"):
    templates.load_templates(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("spec,message", [
    ('metrics: [accuracy]', "unknown metric 'accuracy'; use any of exact_match"),
    ('metrics: [rank_accuracy]', "metric 'rank_accuracy' needs answer_choices"),
    ('answer_choices: [" a", " b"]\n          metrics: [mae]', "metric 'mae' needs numeric answer_choices"),
    ('stop: "x"', "'stop' must be a list of non-empty strings")])
def test_task_metadata_errors_name_file_and_line(tmp_path, spec, message):
  path = _write(tmp_path, f"""\
      src:
        t:
          prompt: "P {{{{ x }}}}"
          completion: " {{{{ y }}}}"
          {spec}
      """)
  with pytest.raises(UserError, match=f"{path}:3: template src/t: " + re.escape(message)):
    templates.load_templates(str(path))


def test_task_metric_defaults_and_empty_stop(tmp_path):
  path = _write(tmp_path, """\
      free: {prompt: "P", completion: " c", stop: []}
      pick: {prompt: "P", completion: " a", answer_choices: [" a", " b"]}
      """)
  loaded = templates.load_templates(str(path))["*"]
  assert loaded["free"].task_metrics == ("exact_match",) and loaded["free"].stop == ()
  assert loaded["pick"].task_metrics == ("exact_match", "rank_accuracy") and loaded["pick"].stop == ("\n",)


def test_find_template_and_render_a_prompt_without_its_answer(tmp_path):
  rating = templates.find_template("amazon_reviews/rating_from_review")
  assert rating.render_prompt({"text": "Great sound."}) == (
      "Predict the associated rating from the following review:\nGreat sound.\nRating (1-5):")
  with pytest.raises(UserError, match="prompt uses field 'text' but the record has fields"):
    rating.render_prompt({"review": "x"})
  path = _write(tmp_path, 'echo: {prompt: "Say {{ text }}", completion: " {{ text }}"}\n', "flat.yaml")
  assert templates.find_template(f"{path}:echo").render_prompt({"text": "hi"}) == "Say hi"
  with pytest.raises(UserError, match="--template='amazon_reviews/nope': no such template; use one of "):
    templates.find_template("amazon_reviews/nope")
