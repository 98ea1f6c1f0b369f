"""Embed a corpus of audio files into Parquet tables (`byola-keras embed`).

    from byola_keras.corpus.run import embed_corpus
    summary = embed_corpus("encoder.keras", "audio/", "embeddings/", frames=True)

    import pandas as pd
    clips = pd.read_parquet("embeddings/clips")    # a row per file
    X = np.stack(clips["embedding"])               # [files, d]

`inputs` (what to embed; standard library only, so the command line checks a
manifest before a backend starts), `batches` (length buckets through the
length-masked encoder), `store` (the Parquet parts, resume and shards),
`progress` (the stderr line) and `run` (the pipeline and `run_cli`). This
package's `__init__` imports none of them.
"""
