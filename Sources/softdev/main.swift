print("softdev")
