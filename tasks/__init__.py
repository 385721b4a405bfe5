"""Task registrations. `import tasks` registers the embedded default collection (cheap: builds no dataset).

Other collections register themselves on import of their module (e.g. `import tasks.flan2021`).
"""
from tasks import default  # noqa: F401
