"""``trial --reporter=mpay``: Twisted's tree reporter plus one plain closing line."""

from twisted.trial.itrial import IReporter
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IReporter)
class _Reporter:
    def __init__(self, name, module, description, longOpt, shortOpt, klass):
        self.name = name
        self.module = module
        self.description = description
        self.longOpt = longOpt
        self.shortOpt = shortOpt
        self.klass = klass


Mpay = _Reporter("mpay", "tests.reporter", "tree output ending with 'N passed, N failed'",
                 "mpay", None, "CountingReporter")
