"""Test doubles that speak real wire formats: not used by the proxy in production.

`upstream` is the fake OpenAI API (fault injection included) that the tests and the
`serve --demo` mode talk to.
"""
