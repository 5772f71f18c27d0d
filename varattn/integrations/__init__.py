"""varattn behind other libraries' attention hooks, one module for each
(`varattn.integrations.transformers` for Hugging Face transformers,
`varattn.integrations.torch` for torch's own), imported on demand: `import
varattn` imports none of them, nor the libraries they serve."""
