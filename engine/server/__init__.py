"""The worker HTTP base shared by the prefill and decode workers.

`protocol` turns OpenAI / SGLang request bodies into `GenerateRequest` messages and formats replies;
`app` is the aiohttp application; `backend` is the interface the app drives (the rank processes of
an instance implement it through `engine.runtime`).
"""
