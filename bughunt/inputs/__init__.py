"""One validation layer for every file and flag bughunt reads: config.json, safetensors headers, shard indexes,
token lists, TOML matrices, baselines and result.json. Each reader here checks types and ranges with pydantic or
jsonschema, compares declared sizes with the bytes present before anything is allocated, and turns every problem
into one BughuntError naming the file, the field, what was found, what was expected and the fix. Inner code then
trusts what it gets."""
