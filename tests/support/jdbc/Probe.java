// A ClickHouse JDBC client nobody here wrote, driven against the aipipe read endpoint:
// one query, a parameterized query, and the DatabaseMetaData calls BI tools make.
// Usage: java -cp <driver jars>:<dir> Probe <jdbc url> <user> <password> <database>
// Prints one tab-separated line per fact; tests/integration/test_queryserver_jdbc.py reads them.
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.Properties;

public final class Probe {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        String database = args[3];
        try (Connection conn = DriverManager.getConnection(args[0], props)) {
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT 1")) {
                rs.next();
                System.out.println("select1\t" + rs.getInt(1));
            }
            String sql = "SELECT client_id, toString(sum(cost_usd)) FROM " + database
                + ".ai_cost_tracking FINAL WHERE client_id = ? GROUP BY client_id";
            try (PreparedStatement ps = conn.prepareStatement(sql)) {
                ps.setString(1, "client-1");
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        System.out.println("sum\t" + rs.getString(1) + "\t" + rs.getString(2));
                    }
                }
            }
            DatabaseMetaData meta = conn.getMetaData();
            System.out.println("product\t" + meta.getDatabaseProductName() + "\t"
                + meta.getDatabaseProductVersion());
            try (ResultSet rs = meta.getTables(null, database, "%", null)) {
                while (rs.next()) {
                    System.out.println("table\t" + rs.getString("TABLE_NAME") + "\t"
                        + rs.getString("TABLE_TYPE"));
                }
            }
            try (ResultSet rs = meta.getColumns(null, database, "ai_cost_tracking", "%")) {
                while (rs.next()) {
                    System.out.println("column\t" + rs.getString("COLUMN_NAME") + "\t"
                        + rs.getString("TYPE_NAME"));
                }
            }
            try (ResultSet rs = meta.getSchemas()) {
                while (rs.next()) {
                    System.out.println("schema\t" + rs.getString("TABLE_SCHEM"));
                }
            }
        }
    }
}
