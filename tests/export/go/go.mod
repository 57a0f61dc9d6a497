module tunery.local/ollamarender

go 1.19
