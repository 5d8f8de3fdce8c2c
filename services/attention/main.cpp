int main() { return 0; }  // placeholder until the attention service lands
