from matvlm.bench.run import main

main()
