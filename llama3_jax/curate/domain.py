"""Language id (py3langid, whose model ships inside the package: nothing is downloaded) and the
rule-based domain classifier that sorts documents into the mix categories.

The rules, in order (the first that holds wins):
- code: at least `code_min_lines` of the non-empty lines look like code (ends in `;`, `{`
  or `}`; a Python block header ending in `:`; a function, class, import, declaration,
  return or preprocessor line; an indented assignment or call; a comment marker; `=>`);
- math: LaTeX commands, `$`, operator expressions (`x^2 + 1 = 5`) and math words
  (theorem, integral, ...) per word reach `math_min_score`;
- multilingual: the document's language is not one of `primary_languages`;
- general: everything else.
"""

from __future__ import annotations

import re

CODE_LINE = re.compile(r"""
    [;{}]\s*$                                                         # C, Java, JS, Rust: ; { } end the line
  | ^\s*[}\])]+[;,)]*\s*$                                              # closing brackets alone
  | ^\s*(?:if|elif|else|for|while|try|except|finally|with|def|class|switch|case)\b[^.!?]*:\s*$   # Python block
  | ^\s*(?:def|function|fn|func)\s+\w+\s*\(                           # a function
  | ^\s*class\s+\w+\s*[(:{]                                           # a class
  | ^\s*(?:import\s+[\w.]+(?:\s+as\s+\w+)?\s*$|from\s+[\w.]+\s+import\s)  # Python imports
  | ^\s*\#\s*(?:include|define|ifdef|ifndef|endif|pragma)\b          # the C preprocessor
  | ^\s*(?:const|let|var|auto)\s+\w+\s*=                              # declarations
  | ^\s*return\b(?:\s+[^\s.][^.]*)?$                                  # return, not "return to the city."
  | ^\s{2,}[\w.\[\]'"]+\s*(?:[-+*/%|&^]?=(?!=)|\()                    # indented assignment or call
  | ^\s*(?://|/\*|\*/)                                                # comments
  | =>""", re.X)
LATEX = re.compile(r"\\(?:frac|sum|int|sqrt|prod|lim|infty|alpha|beta|gamma|delta|theta|lambda|pi|sigma|"
                   r"cdot|times|leq|geq|neq|approx|mathbb|mathrm|left|right|begin|end|partial|nabla)\b|\$")
EXPRESSION = re.compile(r"[\w)\]}]\s*(?:[=<>+*/^]|\\le|\\ge|≤|≥|≠)\s*[\w(\[\\-]")
MATH_WORDS = frozenset("""theorem lemma proof corollary equation equations integral derivative polynomial
matrix matrices eigenvalue vector prime integer integers fraction denominator numerator solve solving solution
probability variance logarithm exponent coefficient quadratic geometry triangle hypotenuse algebra calculus
converges convergence modulo divisible factorial inequality axiom sqrt""".split())
WORD = re.compile(r"\w+")

_IDENTIFIER = None  # one py3langid model per process, loaded on first use (about a second)


def identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def known_languages() -> list[str]:
    return identifier().labels


def identify_language(text: str, max_chars: int = 5000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's first `max_chars` characters."""
    lang, prob = identifier().classify(text[:max_chars] if max_chars > 0 else text)
    return str(lang), float(prob)


def code_share(text: str) -> float:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return 0.0
    code = sum(1 for ln in lines if CODE_LINE.search(ln))
    return code / len(lines)


def math_score(text: str) -> float:
    words = WORD.findall(text.lower())
    if not words:
        return 0.0
    signals = len(LATEX.findall(text)) + len(EXPRESSION.findall(text)) + sum(w in MATH_WORDS for w in words)
    return signals / len(words)


def classify(text: str, language: str, primary_languages, code_min_lines: float, math_min_score: float) -> str:
    if code_share(text) >= code_min_lines:
        return "code"
    if math_score(text) >= math_min_score:
        return "math"
    if language not in primary_languages:
        return "multilingual"
    return "general"
