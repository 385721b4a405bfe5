"""Summarization: CNN/DailyMail, Gigaword, XSum, AESLC, Multi-News, and AG News (FLAN 2021 files AG News here)."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import SUMMARY_METRICS, Flan2021Dataset, label_name

CLUSTER = "summarization"
_TV = {"train": "train", "validation": "validation"}

ARTICLE_SUMMARY = (
    T("{document}\n\nSummarize the article above in a few sentences.", "{summary}"),
    T("Article: {document}\n\nWhat are the main points of this article?", "{summary}"),
    T("Write the highlights of this news story.\n\n{document}", "{summary}"),
    T("{document}\n\nTL;DR:", "{summary}"),
    T("Give a brief summary of the following text:\n{document}", "{summary}"),
    T("Read the story below and condense it.\n\n{document}\n\nSummary:", "{summary}"),
    T("Here is a news report:\n{document}\nSum it up.", "{summary}"),
    T("Boil this article down to its key facts: {document}", "{summary}"),
)
ARTICLE_SUMMARY_INVERSIONS = (
    T("Write a news article based on these highlights:\n{summary}", "{document}"),
    T("Summary: {summary}\n\nExpand this into a full article.", "{document}"),
)

HEADLINE = (
    T("Write a headline for this sentence: {document}", "{summary}"),
    T("{document}\n\nShort title:", "{summary}"),
    T("Summarize in a few words: {document}", "{summary}"),
    T("What would be a good news headline for the following?\n{document}", "{summary}"),
    T("Text: {document}\nHeadline:", "{summary}"),
    T("Compress this into a very brief summary: {document}", "{summary}"),
    T("Give this lead sentence a title.\n\n{document}", "{summary}"),
    T("{document}\n\nWhat is this mainly about, in a short phrase?", "{summary}"),
)
HEADLINE_INVERSIONS = (
    T("Write a sentence that could appear under the headline \"{summary}\".", "{document}"),
)

ONE_SENTENCE = (
    T("{document}\n\nSummarize this in one sentence.", "{summary}"),
    T("Article: {document}\n\nOne-line summary:", "{summary}"),
    T("What is the article below about? Answer in a single sentence.\n\n{document}", "{summary}"),
    T("Read this BBC article and write its one-sentence summary.\n{document}", "{summary}"),
    T("{document}\n\nIn a nutshell:", "{summary}"),
    T("Give the gist of the following story in one sentence: {document}", "{summary}"),
    T("Summarize the text in a single sentence.\nText: {document}", "{summary}"),
    T("Here is a news story.\n{document}\nWhat happened, in one sentence?", "{summary}"),
)
ONE_SENTENCE_INVERSIONS = (
    T("Write an article that this sentence could summarize: {summary}", "{document}"),
)

EMAIL_SUBJECT = (
    T("{document}\n\nWrite a subject line for this email.", "{summary}"),
    T("Email: {document}\nSubject:", "{summary}"),
    T("What would be a good subject line for the following message?\n\n{document}", "{summary}"),
    T("Suggest a title for this email: {document}", "{summary}"),
    T("Here is the body of an email:\n{document}\nGive it a short subject.", "{summary}"),
    T("Generate the subject line of this business email.\n\n{document}", "{summary}"),
    T("{document}\n\nThe email's subject is probably:", "{summary}"),
    T("Summarize this email in a few words, as its subject: {document}", "{summary}"),
)
EMAIL_SUBJECT_INVERSIONS = (
    T("Write an email with the subject line \"{summary}\".", "{document}"),
    T("Subject: {summary}\nBody:", "{document}"),
)

MULTI_DOCUMENT = (
    T("{document}\n\nWrite a summary of the news reports above.", "{summary}"),
    T("Several articles about one event follow.\n\n{document}\n\nSummarize them together.", "{summary}"),
    T("Combine these sources into one short summary:\n{document}", "{summary}"),
    T("Documents: {document}\n\nSummary:", "{summary}"),
    T("Read the articles and explain what happened.\n{document}", "{summary}"),
    T("Summarize the following collection of news articles: {document}", "{summary}"),
    T("{document}\n\nWhat do these reports say, in brief?", "{summary}"),
    T("Produce an overview of the documents below.\n\n{document}", "{summary}"),
)
MULTI_DOCUMENT_INVERSIONS = (
    T("Write news articles that cover this summary:\n{summary}", "{document}"),
)

NEWS_TOPIC = (
    T("{title}\n{description}\n\nWhat is this article about?", "{answer}"),
    T("Headline: {title}\nText: {description}\nWhich section of a newspaper does this belong to?", "{answer}"),
    T("Classify the topic of this news item.\n\n{title}. {description}", "{answer}"),
    T("Is the following story about world news, sports, business, or science and technology?\n{description}",
      "{answer}"),
    T("{description}\n\nChoose the best topic for this text.", "{answer}"),
    T("Article title: {title}\nWhat kind of news is this?", "{answer}"),
    T("Read the news summary and give its category: {title} -- {description}", "{answer}"),
    T("News: {description}\nTopic:", "{answer}"),
)
NEWS_TOPIC_INVERSIONS = (
    T("Write a headline for a {answer} news story.", "{title}"),
    T("Write the opening of a news article about {answer}.", "{description}"),
)
NEWS_TOPICS = ("World", "Sports", "Business", "Science/Tech")


def _summary(document_key, summary_key):
    def map_fn(r):
        document, summary = r.get(document_key), r.get(summary_key)
        return None if not document or not summary else {"document": document, "summary": summary}
    return map_fn


def _ag_news(r):
    answer = label_name(NEWS_TOPICS, r.get("label"))
    return None if answer is None else {"title": r["title"], "description": r["description"], "answer": answer}


_DOC = ("document", "summary")

DATASETS = [
    Flan2021Dataset("cnn_dailymail", "cnn_dailymail", CLUSTER, _TV, {"train": 287_113, "validation": 13_368},
                    _summary("article", "highlights"), _DOC, ARTICLE_SUMMARY, ARTICLE_SUMMARY_INVERSIONS,
                    metric_fns=SUMMARY_METRICS),
    Flan2021Dataset("gigaword", "gigaword", CLUSTER, _TV, {"train": 3_803_957, "validation": 189_651},
                    _summary("document", "summary"), _DOC, HEADLINE, HEADLINE_INVERSIONS,
                    metric_fns=SUMMARY_METRICS),
    Flan2021Dataset("xsum", "xsum", CLUSTER, _TV, {"train": 203_577, "validation": 11_305},
                    _summary("document", "summary"), _DOC, ONE_SENTENCE, ONE_SENTENCE_INVERSIONS,
                    metric_fns=SUMMARY_METRICS, note="TFDS xsum needs a manual download"),
    Flan2021Dataset("aeslc", "aeslc", CLUSTER, _TV, {"train": 14_436, "validation": 1_960},
                    _summary("email_body", "subject_line"), _DOC, EMAIL_SUBJECT, EMAIL_SUBJECT_INVERSIONS,
                    metric_fns=SUMMARY_METRICS),
    Flan2021Dataset("multi_news", "multi_news", CLUSTER, _TV, {"train": 44_972, "validation": 5_622},
                    _summary("document", "summary"), _DOC, MULTI_DOCUMENT, MULTI_DOCUMENT_INVERSIONS,
                    metric_fns=SUMMARY_METRICS),
    Flan2021Dataset("ag_news_subset", "ag_news_subset", CLUSTER, {"train": "train", "validation": "test"},
                    {"train": 120_000, "validation": 7_600}, _ag_news, ("title", "description", "answer"),
                    NEWS_TOPIC, NEWS_TOPIC_INVERSIONS, fixed_options=NEWS_TOPICS),
]
